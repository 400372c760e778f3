package android.content.res;

import java.io.File;
import java.io.FileInputStream;
import java.io.FilterInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.RandomAccessFile;

/**
 * Host stand-in for {@code android.content.res.AssetManager}: serves the files
 * under a host directory as assets. {@link #open} and {@link #openFd} have the
 * real signatures; the constructor and {@link #openHandles} exist only here, so
 * that a test can tell whether every stream and descriptor was closed.
 */
public final class AssetManager {
  private final File root;
  private int openHandles;

  public AssetManager(File root) {
    this.root = root;
  }

  /** Streams and descriptors opened and not yet closed (host stand-in only). */
  public synchronized int openHandles() {
    return openHandles;
  }

  synchronized void released() {
    openHandles--;
  }

  private synchronized void opened() {
    openHandles++;
  }

  public InputStream open(String fileName) throws IOException {
    InputStream in = new FileInputStream(new File(root, fileName));
    opened();
    return new FilterInputStream(in) {
      private boolean closed;

      @Override
      public void close() throws IOException {
        if (!closed) {
          closed = true;
          released();
        }
        super.close();
      }
    };
  }

  public AssetFileDescriptor openFd(String fileName) throws IOException {
    AssetFileDescriptor fd =
        new AssetFileDescriptor(new RandomAccessFile(new File(root, fileName), "r"), this);
    opened();
    return fd;
  }
}
