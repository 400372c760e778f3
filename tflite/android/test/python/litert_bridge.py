"""LiteRT behind the host stand-in of `org.tensorflow.lite.Interpreter`.

The Java stand-in (test/java/org/tensorflow/lite/Interpreter.java) starts
this script for a real `.tflite` model and speaks to it over stdin/stdout,
every message a 4-byte big-endian length and its bytes:

- Java sends the model bytes and the thread count (text); the script loads
  them in `ai_edge_litert`'s Interpreter and answers with one line per
  input, then per output, in the model's own order:
  `input|output NAME DTYPE SHAPE SCALE ZERO_POINT` (the stand-in's format).
- Java sends the number of inputs given, then their raw bytes in input
  order; the script sets them, invokes once and answers with each output's
  raw bytes in output order. A count of -1, or the end of stdin, ends the
  script.

So the host test runs the same LiteRT as Android on the real file; only the
JNI layer is replaced.
"""

import struct
import sys

import numpy as np
from ai_edge_litert.interpreter import Interpreter


def _read(stream) -> bytes:
    (size,) = struct.unpack(">i", stream.read(4))
    data = stream.read(size)
    if len(data) != size:
        raise EOFError("the stand-in closed the stream")
    return data


def _write(stream, data: bytes) -> None:
    stream.write(struct.pack(">i", len(data)) + data)


def _line(kind: str, detail: dict) -> str:
    name = detail["name"] or f"tensor_{detail['index']}"
    dtype = np.dtype(detail["dtype"]).name
    shape = "x".join(str(d) for d in detail["shape"]) or "1"
    scale, zero_point = detail["quantization"]
    return f"{kind} {name} {dtype} {shape} {float(scale)!r} {int(zero_point)}"


def main() -> None:
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    model = _read(source)
    threads = int(_read(source).decode())
    # Java's default of -1 threads: LiteRT's own default.
    interpreter = Interpreter(
        model_content=model, num_threads=threads if threads > 0 else None
    )
    interpreter.allocate_tensors()
    inputs = interpreter.get_input_details()
    outputs = interpreter.get_output_details()
    lines = [_line("input", d) for d in inputs] + [_line("output", d) for d in outputs]
    _write(sink, "\n".join(lines).encode())
    sink.flush()
    while True:
        header = source.read(4)
        if len(header) < 4:  # the JVM ended without closing the interpreter
            return
        (count,) = struct.unpack(">i", header)
        if count < 0:
            return
        for detail in inputs[:count]:
            value = np.frombuffer(_read(source), detail["dtype"])
            interpreter.set_tensor(detail["index"], value.reshape(detail["shape"]))
        interpreter.invoke()
        for detail in outputs:
            _write(sink, interpreter.get_tensor(detail["index"]).tobytes())
        sink.flush()


if __name__ == "__main__":
    main()
