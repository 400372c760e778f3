package org.tensorflow.lite;

/**
 * Host stand-in for LiteRT's {@code org.tensorflow.lite.DataType}: the two
 * element types a keras-earlyexit bundle's inputs and outputs use.
 */
public enum DataType {
  FLOAT32,
  INT8;

  /** Size of an element in bytes. */
  public int byteSize() {
    return this == FLOAT32 ? 4 : 1;
  }
}
