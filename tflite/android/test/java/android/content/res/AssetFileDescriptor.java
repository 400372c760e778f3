package android.content.res;

import java.io.Closeable;
import java.io.FileDescriptor;
import java.io.IOException;
import java.io.RandomAccessFile;

/**
 * Host stand-in for {@code android.content.res.AssetFileDescriptor}: an open
 * file of the host directory that {@link AssetManager} serves as assets. Same
 * signatures as the members EarlyExitClassifier uses; not Android's
 * implementation (no APK offsets: the asset is the whole file).
 */
public class AssetFileDescriptor implements Closeable {
  private final RandomAccessFile file;
  private final AssetManager owner;
  private boolean closed;

  AssetFileDescriptor(RandomAccessFile file, AssetManager owner) {
    this.file = file;
    this.owner = owner;
  }

  public FileDescriptor getFileDescriptor() throws IOException {
    return file.getFD();
  }

  public long getStartOffset() {
    return 0;
  }

  public long getDeclaredLength() throws IOException {
    return file.length();
  }

  @Override
  public void close() throws IOException {
    if (!closed) {
      closed = true;
      owner.released();
      file.close();
    }
  }
}
