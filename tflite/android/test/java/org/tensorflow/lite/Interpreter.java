package org.tensorflow.lite;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Map;

/**
 * Host stand-in for LiteRT's {@code org.tensorflow.lite.Interpreter}, which
 * needs Android's JNI library and cannot run on a host JVM. It has the real
 * signatures of the members EarlyExitClassifier uses and their documented
 * behaviour for direct ByteBuffers (an input buffer must hold exactly the
 * tensor's bytes; inputs not passed keep their previous values; outputs are
 * written at the buffer's position). It is not a TFLite interpreter.
 *
 * <p>Its "model" is a text file, not a TFLite flatbuffer. One line per tensor,
 * in position order; '#' starts a comment:
 *
 * <pre>
 * input  NAME DTYPE SHAPE SCALE ZERO_POINT
 * output NAME DTYPE SHAPE SCALE ZERO_POINT RULE ARGS...
 * </pre>
 *
 * DTYPE is float32 or int8, SHAPE like 1x5, SCALE and ZERO_POINT are 0 0 for a
 * float tensor. Outputs are computed from the dequantized inputs, then
 * quantized as TFLite does (round half away from zero, clamp to int8):
 * {@code copy I} is input I; {@code take I E} is element E of input I;
 * {@code onehot I E} is 1 at index round(element E of input I), 0 elsewhere.
 *
 * <p>A real TFLite flatbuffer (file identifier "TFL3") is not computed here:
 * the stand-in hands it to LiteRT's Python interpreter ({@link LiteRtBridge})
 * and forwards each {@link #runForMultipleInputsOutputs} to one invoke
 * there, so that tests of a real model get LiteRT's own outputs. Tensors,
 * names and indices are then those LiteRT reports for the model.
 *
 * <p>{@link #liveInstances} exists only here: interpreters created and not
 * closed, so that a test can tell whether every one was closed.
 */
public final class Interpreter implements AutoCloseable {
  /** Interpreter options; only the thread count is kept. */
  public static class Options {
    int numThreads = -1;

    public Options setNumThreads(int numThreads) {
      this.numThreads = numThreads;
      return this;
    }
  }

  private static int live;

  /** Interpreters created and not yet closed (host stand-in only). */
  public static synchronized int liveInstances() {
    return live;
  }

  private static final class StandInTensor implements Tensor {
    final String name;
    final DataType dtype;
    final int[] shape;
    final float scale;
    final int zeroPoint;
    final String[] rule;
    final ByteBuffer data;

    StandInTensor(String[] fields, boolean ruled) {
      if (fields.length < 6 || (ruled && fields.length < 8)) {
        throw new IllegalArgumentException("Stand-in model line too short: " + String.join(" ", fields));
      }
      name = fields[1];
      dtype = DataType.valueOf(fields[2].toUpperCase());
      shape = Arrays.stream(fields[3].split("x")).mapToInt(Integer::parseInt).toArray();
      scale = Float.parseFloat(fields[4]);
      zeroPoint = Integer.parseInt(fields[5]);
      rule = ruled ? Arrays.copyOfRange(fields, 6, fields.length) : null;
      data = ByteBuffer.allocate(numBytes()).order(ByteOrder.nativeOrder());
    }

    @Override
    public DataType dataType() {
      return dtype;
    }

    @Override
    public int numBytes() {
      return numElements() * dtype.byteSize();
    }

    @Override
    public int numElements() {
      int n = 1;
      for (int d : shape) {
        n *= d;
      }
      return n;
    }

    @Override
    public int[] shape() {
      return shape.clone();
    }

    @Override
    public String name() {
      return name;
    }

    @Override
    public QuantizationParams quantizationParams() {
      return new QuantizationParams(scale, zeroPoint);
    }

    float get(int i) {
      return dtype == DataType.FLOAT32 ? data.getFloat(4 * i) : (data.get(i) - zeroPoint) * scale;
    }

    void set(int i, float value) {
      if (dtype == DataType.FLOAT32) {
        data.putFloat(4 * i, value);
      } else {
        float v = value / scale;
        float r = v >= 0f ? (float) Math.floor(v + 0.5f) : -(float) Math.floor(-v + 0.5f);
        data.put(i, (byte) Math.max(-128f, Math.min(127f, r + zeroPoint)));
      }
    }
  }

  private final List<StandInTensor> inputs = new ArrayList<>();
  private final List<StandInTensor> outputs = new ArrayList<>();
  private final LiteRtBridge bridge;
  private boolean closed;

  public Interpreter(ByteBuffer byteBuffer, Options options) {
    ByteBuffer view = byteBuffer.duplicate();
    view.rewind();
    byte[] bytes = new byte[view.remaining()];
    view.get(bytes);
    boolean tflite =
        bytes.length >= 8 && new String(bytes, 4, 4, StandardCharsets.US_ASCII).equals("TFL3");
    bridge = tflite ? new LiteRtBridge(bytes, options.numThreads) : null;
    try {
      parse(tflite ? bridge.describe() : new String(bytes, StandardCharsets.UTF_8), tflite);
    } catch (RuntimeException e) {
      if (bridge != null) {
        bridge.close();
      }
      throw e;
    }
    synchronized (Interpreter.class) {
      live++;
    }
  }

  private void parse(String text, boolean tflite) {
    for (String line : text.split("\n")) {
      String[] fields = line.replaceAll("#.*", "").trim().split("\\s+");
      if (fields[0].equals("input")) {
        inputs.add(new StandInTensor(fields, false));
      } else if (fields[0].equals("output")) {
        outputs.add(new StandInTensor(fields, !tflite));
      } else if (!fields[0].isEmpty()) {
        throw new IllegalArgumentException(
            "The model is not a stand-in model (see Interpreter.java): " + line);
      }
    }
  }

  public void allocateTensors() {
    checkNotClosed();
  }

  public int getInputTensorCount() {
    checkNotClosed();
    return inputs.size();
  }

  public int getOutputTensorCount() {
    checkNotClosed();
    return outputs.size();
  }

  public Tensor getInputTensor(int inputIndex) {
    checkNotClosed();
    if (inputIndex < 0 || inputIndex >= inputs.size()) {
      throw new IllegalArgumentException("Invalid input Tensor index: " + inputIndex);
    }
    return inputs.get(inputIndex);
  }

  public Tensor getOutputTensor(int outputIndex) {
    checkNotClosed();
    if (outputIndex < 0 || outputIndex >= outputs.size()) {
      throw new IllegalArgumentException("Invalid output Tensor index: " + outputIndex);
    }
    return outputs.get(outputIndex);
  }

  public int getInputIndex(String opName) {
    checkNotClosed();
    return indexOf(inputs, opName, "input");
  }

  public int getOutputIndex(String opName) {
    checkNotClosed();
    return indexOf(outputs, opName, "output");
  }

  private static int indexOf(List<StandInTensor> tensors, String name, String role) {
    for (int i = 0; i < tensors.size(); i++) {
      if (tensors.get(i).name.equals(name)) {
        return i;
      }
    }
    throw new IllegalArgumentException(
        String.format("Input error: '%s' is not a valid name for any %s.", name, role));
  }

  public void runForMultipleInputsOutputs(Object[] inputValues, Map<Integer, Object> outputValues) {
    checkNotClosed();
    if (inputValues == null || inputValues.length == 0 || inputValues.length > inputs.size()) {
      throw new IllegalArgumentException("Invalid number of inputs: " + (inputValues == null ? 0 : inputValues.length));
    }
    for (int i = 0; i < inputValues.length; i++) {
      StandInTensor tensor = inputs.get(i);
      ByteBuffer source = (ByteBuffer) inputValues[i];
      if (source.capacity() != tensor.numBytes()) {
        throw new IllegalArgumentException(String.format(
            "Cannot copy to a TensorFlowLite tensor (%s) with %d bytes from a Java Buffer with %d bytes.",
            tensor.name, tensor.numBytes(), source.capacity()));
      }
      for (int b = 0; b < tensor.numBytes(); b++) {
        tensor.data.put(b, source.get(b));
      }
    }
    if (bridge != null) {
      List<byte[]> given = new ArrayList<>();
      for (int i = 0; i < inputValues.length; i++) {
        given.add(inputs.get(i).data.array());  // heap buffer: array() is its content
      }
      byte[][] results = bridge.invoke(given, outputs.size());
      for (int i = 0; i < outputs.size(); i++) {
        outputs.get(i).data.clear();
        outputs.get(i).data.put(results[i]);
      }
    } else {
      computeRules();
    }
    for (Map.Entry<Integer, Object> entry : outputValues.entrySet()) {
      StandInTensor tensor = outputs.get(entry.getKey());
      ByteBuffer destination = (ByteBuffer) entry.getValue();
      tensor.data.rewind();
      destination.put(tensor.data);
    }
  }

  /** The outputs of a text model, from their rules. */
  private void computeRules() {
    for (StandInTensor out : outputs) {
      StandInTensor in = inputs.get(Integer.parseInt(out.rule[1]));
      switch (out.rule[0]) {
        case "copy":
          for (int j = 0; j < out.numElements(); j++) {
            out.set(j, in.get(j));
          }
          break;
        case "take":
          out.set(0, in.get(Integer.parseInt(out.rule[2])));
          break;
        case "onehot":
          int hot = Math.round(in.get(Integer.parseInt(out.rule[2])));
          for (int j = 0; j < out.numElements(); j++) {
            out.set(j, j == hot ? 1f : 0f);
          }
          break;
        default:
          throw new IllegalArgumentException("Unknown stand-in rule " + out.rule[0]);
      }
    }
  }

  @Override
  public void close() {
    if (!closed) {
      closed = true;
      if (bridge != null) {
        bridge.close();
      }
      synchronized (Interpreter.class) {
        live--;
      }
    }
  }

  private void checkNotClosed() {
    if (closed) {
      throw new IllegalStateException("Internal error: The Interpreter has already been closed.");
    }
  }
}
