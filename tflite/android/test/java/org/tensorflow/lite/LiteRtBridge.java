package org.tensorflow.lite;

import java.io.DataInputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.util.List;

/**
 * Host test only, no counterpart in LiteRT: runs a real {@code .tflite}
 * model for the {@link Interpreter} stand-in in LiteRT's Python interpreter
 * ({@code ai_edge_litert}), through test/python/litert_bridge.py, which
 * documents the messages. The system properties {@code kee.litert.python}
 * (a Python with ai-edge-litert) and {@code kee.litert.bridge} (the script)
 * name them.
 */
final class LiteRtBridge {
  private final Process process;
  private final DataOutputStream toBridge;
  private final DataInputStream fromBridge;

  /** Starts the bridge and hands it {@code model}; {@link #describe} answers. */
  LiteRtBridge(byte[] model, int numThreads) {
    String python = System.getProperty("kee.litert.python");
    String script = System.getProperty("kee.litert.bridge");
    if (python == null || script == null) {
      throw new IllegalStateException(
          "The host stand-in runs real .tflite models through LiteRT in Python: set the system "
              + "properties kee.litert.python and kee.litert.bridge (see tests/test_android_kotlin.py).");
    }
    try {
      process =
          new ProcessBuilder(python, script)
              .redirectError(ProcessBuilder.Redirect.INHERIT)
              .start();
    } catch (IOException e) {
      throw new IllegalStateException("Cannot start " + python + " " + script, e);
    }
    toBridge = new DataOutputStream(process.getOutputStream());
    fromBridge = new DataInputStream(process.getInputStream());
    try {
      send(model);
      send(Integer.toString(numThreads).getBytes(StandardCharsets.UTF_8));
      toBridge.flush();
    } catch (IOException e) {
      process.destroy();
      throw new IllegalStateException("The LiteRT bridge did not take the model.", e);
    }
  }

  /** The model's tensors, in the stand-in's line format (see Interpreter). */
  String describe() {
    try {
      return new String(receive(), StandardCharsets.UTF_8);
    } catch (IOException e) {
      process.destroy();
      // LiteRT's own message is on stderr.
      throw new IllegalArgumentException("LiteRT could not load the model (see stderr).", e);
    }
  }

  /** One invoke: the inputs given (the first ones, in order) in, every output back. */
  byte[][] invoke(List<byte[]> inputs, int outputCount) {
    try {
      toBridge.writeInt(inputs.size());
      for (byte[] input : inputs) {
        send(input);
      }
      toBridge.flush();
      byte[][] outputs = new byte[outputCount][];
      for (int i = 0; i < outputCount; i++) {
        outputs[i] = receive();
      }
      return outputs;
    } catch (IOException e) {
      throw new IllegalStateException("The LiteRT bridge failed during invoke (see stderr).", e);
    }
  }

  void close() {
    try {
      toBridge.writeInt(-1);
      toBridge.flush();
      process.waitFor();
    } catch (IOException | InterruptedException e) {
      process.destroy();
    }
  }

  private void send(byte[] data) throws IOException {
    toBridge.writeInt(data.length);
    toBridge.write(data);
  }

  private byte[] receive() throws IOException {
    byte[] data = new byte[fromBridge.readInt()];
    fromBridge.readFully(data);
    return data;
  }
}
