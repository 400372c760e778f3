package org.tensorflow.lite;

/**
 * Host stand-in for LiteRT's {@code org.tensorflow.lite.Tensor}: the members
 * EarlyExitClassifier uses, with the real signatures.
 */
public interface Tensor {
  /** Scale and zero point; both 0 for a tensor that is not quantized. */
  class QuantizationParams {
    private final float scale;
    private final int zeroPoint;

    public QuantizationParams(float scale, int zeroPoint) {
      this.scale = scale;
      this.zeroPoint = zeroPoint;
    }

    public float getScale() {
      return scale;
    }

    public int getZeroPoint() {
      return zeroPoint;
    }
  }

  DataType dataType();

  int numBytes();

  int numElements();

  int[] shape();

  String name();

  QuantizationParams quantizationParams();
}
