package org.tensorflow.lite;

/**
 * Host stand-in for LiteRT's {@code org.tensorflow.lite.DataType}: the
 * element types a keras-earlyexit bundle's or fused model's inputs and
 * outputs use.
 */
public enum DataType {
  FLOAT32,
  INT32,
  INT8;

  /** Size of an element in bytes. */
  public int byteSize() {
    return this == INT8 ? 1 : 4;
  }
}
