// Gated early-exit inference on Android over LiteRT (TFLite Interpreter API).
//
// One Interpreter per segment; direct ByteBuffers allocated once and reused.
// The loop mirrors keras_earlyexit/runtime/gated.py (GatedInterpreter._run)
// step for step; comments name the Python step.
package io.github.kerasearlyexit

import android.content.Context
import org.json.JSONObject
import org.tensorflow.lite.Interpreter
import java.io.Closeable
import java.io.FileInputStream
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.MappedByteBuffer
import java.nio.channels.FileChannel
import kotlin.math.abs
import kotlin.math.ceil
import kotlin.math.floor

/** Result of one sample: class, 0-based exit index and its confidence. */
data class EarlyExitResult(val label: Int, val exitIndex: Int, val confidence: Float)

/** One input or output tensor entry of manifest.json. */
class TensorSpec(json: JSONObject) {
    val name: String = json.getString("name")
    val position: Int = json.getInt("position")
    val shape: IntArray = json.getJSONArray("shape").let { a -> IntArray(a.length()) { a.getInt(it) } }
    val dtype: String = json.getString("dtype")
    val scale: Float = if (json.isNull("scale")) 0f else json.getDouble("scale").toFloat()
    val zeroPoint: Int = if (json.isNull("zero_point")) 0 else json.getInt("zero_point")
    val quantized: Boolean get() = scale > 0f
}

/**
 * Runs a keras-earlyexit bundle (segment_k.tflite + manifest.json in assets/).
 *
 * Not thread safe: one classifier per thread (buffers are shared).
 *
 * @param assetDir folder under assets/ holding the bundle.
 * @param numThreads threads per Interpreter.
 */
class EarlyExitClassifier(
    context: Context,
    assetDir: String,
    private val numThreads: Int = 1
) : Closeable {
    private inner class Segment(json: JSONObject, model: MappedByteBuffer) {
        val file: String = json.getString("file")
        val inputs = json.getJSONArray("inputs").let { a -> List(a.length()) { TensorSpec(a.getJSONObject(it)) } }
        val outputs = json.getJSONArray("outputs").let { a -> List(a.length()) { TensorSpec(a.getJSONObject(it)) } }
        val logits = output("logits")
        val confidence = output("confidence")
        val gateThreshold: Float = json.getJSONObject("gate").getDouble("threshold").toFloat()
        val interpreter = Interpreter(model, Interpreter.Options().setNumThreads(numThreads))

        // Buffers by position, allocated once. Input buffers may be replaced by
        // the previous segment's output buffers (carry without copying).
        val inputBuffers = arrayOfNulls<ByteBuffer>(inputs.size)
        val outputBuffers: Array<ByteBuffer> = Array(interpreter.outputTensorCount) {
            direct(interpreter.getOutputTensor(it).numBytes())
        }
        val outputMap: Map<Int, Any> = outputBuffers.withIndex().associate { it.index to it.value as Any }

        // The inputBuffers as runForMultipleInputsOutputs takes them, built once.
        lateinit var inputArray: Array<Any>

        // (output of this segment, input of the next, requantize?)
        var carry: List<Triple<TensorSpec, TensorSpec, Boolean>> = emptyList()
        var threshold = 0f
        var thresholdQuantized = 0

        fun output(name: String): TensorSpec = outputs.firstOrNull { it.name == name }
            ?: throw IllegalArgumentException(
                "Segment $file has no output '$name'; it has ${outputs.map { it.name }}. " +
                    "The bundle was not written by this version of keras-earlyexit: convert again."
            )

        init {
            interpreter.allocateTensors()
            // The manifest's quantization must be the model's: read it back
            // from the tensors, so a stale manifest fails here, not silently.
            for (t in inputs) verifyQuantization(t, interpreter.getInputTensor(t.position).quantizationParams().scale,
                interpreter.getInputTensor(t.position).quantizationParams().zeroPoint)
            for (t in outputs) verifyQuantization(t, interpreter.getOutputTensor(t.position).quantizationParams().scale,
                interpreter.getOutputTensor(t.position).quantizationParams().zeroPoint)
        }

        private fun verifyQuantization(t: TensorSpec, scale: Float, zeroPoint: Int) {
            if (t.quantized && (abs(scale - t.scale) > 1e-6f * t.scale || zeroPoint != t.zeroPoint)) {
                throw IllegalStateException(
                    "manifest.json says tensor '${t.name}' of $file has scale ${t.scale}, zero point " +
                        "${t.zeroPoint}; the model has $scale, $zeroPoint. Copy the whole bundle again."
                )
            }
        }
    }

    private val segments: List<Segment>
    val exitNames: List<String>
    val numClasses: Int
    val exitCounts: IntArray

    init {
        val manifest = JSONObject(context.assets.open("$assetDir/manifest.json").bufferedReader().use { it.readText() })
        if (manifest.optString("format") != "keras-earlyexit-tflite" || manifest.optInt("format_version") != 1) {
            throw IllegalArgumentException(
                "assets/$assetDir/manifest.json is not a keras-earlyexit bundle of format_version 1; " +
                    "export it with kee.export.to_tflite of a matching version."
            )
        }
        val entries = manifest.getJSONArray("segments")
        segments = List(entries.length()) { k ->
            val json = entries.getJSONObject(k)
            Segment(json, mapAsset(context, "$assetDir/${json.getString("file")}"))
        }
        exitNames = manifest.getJSONArray("exit_names").let { a -> List(a.length()) { a.getString(it) } }
        numClasses = manifest.getInt("num_classes")
        exitCounts = IntArray(segments.size)
        // Segment 1 reads the sample from its own buffers.
        for (t in segments[0].inputs) {
            segments[0].inputBuffers[t.position] = direct(segments[0].interpreter.getInputTensor(t.position).numBytes())
        }
        // gated.py __init__: carry pairs, requantize where parameters differ.
        for (k in 1 until segments.size) {
            val previous = segments[k - 1]
            val next = segments[k]
            previous.carry = next.inputs.map { target ->
                val source = previous.output(target.name)
                val requantize = source.scale != target.scale || source.zeroPoint != target.zeroPoint
                // Same parameters: the next segment reads the output buffer
                // itself (no copy). Otherwise it gets its own buffer.
                next.inputBuffers[target.position] = if (requantize) {
                    direct(next.interpreter.getInputTensor(target.position).numBytes())
                } else {
                    previous.outputBuffers[source.position]
                }
                Triple(source, target, requantize)
            }
        }
        for (segment in segments) {
            segment.inputArray = Array(segment.inputs.size) { segment.inputBuffers[it]!! }
        }
        setThresholds(FloatArray(segments.size - 1) { segments[it].gateThreshold })
    }

    val numExits: Int get() = segments.size

    /** One threshold per non-final exit, in [0, 1]; int8 bundles compare in int8. */
    fun setThresholds(thresholds: FloatArray) {
        require(thresholds.size == segments.size - 1 && thresholds.all { it in 0f..1f }) {
            "Expected ${segments.size - 1} thresholds in [0, 1] (one per non-final exit); " +
                "received ${thresholds.toList()}."
        }
        for ((k, segment) in segments.withIndex()) {
            val t = if (k < thresholds.size) thresholds[k] else 0f
            segment.threshold = t
            val c = segment.confidence
            if (c.quantized) segment.thresholdQuantized = quantizeThreshold(t, c.scale, c.zeroPoint)
        }
    }

    /**
     * Gated inference on one sample: [input] holds segment 1's first input as
     * floats on the model's training scale, flattened (e.g. 8*8*1 pixels).
     */
    fun classify(input: FloatArray): EarlyExitResult {
        // gated.py _prepare: quantize with the manifest's parameters.
        val spec = segments[0].inputs[0]
        val buffer = segments[0].inputBuffers[spec.position]!!
        buffer.rewind()
        if (spec.quantized) {
            for (x in input) buffer.put(quantize(x, spec.scale, spec.zeroPoint))
        } else {
            for (x in input) buffer.putFloat(x)
        }
        require(buffer.position() == buffer.capacity()) {
            "Input '${spec.name}' takes ${buffer.capacity()} bytes; received ${input.size} floats."
        }
        val last = segments.size - 1
        for ((k, segment) in segments.withIndex()) {
            // gated.py: runner.set_input(...) (buffers already hold the sample or carry).
            for (b in segment.inputArray) (b as ByteBuffer).rewind()
            for (b in segment.outputBuffers) b.rewind()
            // gated.py: runner.invoke()
            segment.interpreter.runForMultipleInputsOutputs(segment.inputArray, segment.outputMap)
            // gated.py: confidence = runner.get_output(segment.confidence)
            val c = segment.confidence
            val out = segment.outputBuffers[c.position]
            val confident = if (c.quantized) {
                out.get(0).toInt() >= segment.thresholdQuantized
            } else {
                out.getFloat(0) >= segment.threshold
            }
            // gated.py: `if k == last or confidence >= segment.threshold`
            if (k == last || confident) {
                val confidence = if (c.quantized) (out.get(0) - c.zeroPoint) * c.scale else out.getFloat(0)
                exitCounts[k]++
                return EarlyExitResult(argmax(segment.logits, segment.outputBuffers[segment.logits.position]), k, confidence)
            }
            // gated.py: collect the carry; requantize where needed. Carries with
            // equal parameters are already the next segment's input buffers.
            for ((source, target, requantize) in segment.carry) {
                if (!requantize) continue
                val from = segment.outputBuffers[source.position]
                val to = segments[k + 1].inputBuffers[target.position]!!
                to.rewind()
                for (i in 0 until from.capacity()) {
                    to.put(quantize((from.get(i) - source.zeroPoint) * source.scale, target.scale, target.zeroPoint))
                }
            }
        }
        throw IllegalStateException("unreachable: the final exit takes every sample")
    }

    override fun close() {
        for (segment in segments) segment.interpreter.close()
    }

    private fun argmax(spec: TensorSpec, buffer: ByteBuffer): Int {
        // First maximum on ties, as numpy.argmax.
        var best = 0
        if (spec.dtype == "int8") {
            for (i in 1 until buffer.capacity()) if (buffer.get(i) > buffer.get(best)) best = i
        } else {
            for (i in 1 until buffer.capacity() / 4) if (buffer.getFloat(4 * i) > buffer.getFloat(4 * best)) best = i
        }
        return best
    }

    companion object {
        private fun direct(bytes: Int): ByteBuffer = ByteBuffer.allocateDirect(bytes).order(ByteOrder.nativeOrder())

        private fun mapAsset(context: Context, path: String): MappedByteBuffer {
            // Bundles must be stored uncompressed (aaptOptions/noCompress "tflite").
            val fd = context.assets.openFd(path)
            return FileInputStream(fd.fileDescriptor).channel.use {
                it.map(FileChannel.MapMode.READ_ONLY, fd.startOffset, fd.declaredLength)
            }
        }

        /** Float to int8 as TFLite's QUANTIZE (round half away from zero); gated.py quantize. */
        fun quantize(x: Float, scale: Float, zeroPoint: Int): Byte {
            val v = x / scale
            val r = if (v >= 0f) floor(v + 0.5f) else -floor(-v + 0.5f)
            return (r + zeroPoint).coerceIn(-128f, 127f).toInt().toByte()
        }

        /** Smallest int8 q with (q - zeroPoint) * scale >= threshold; manifest.quantize_threshold. */
        fun quantizeThreshold(threshold: Float, scale: Float, zeroPoint: Int): Int {
            val q = ceil(zeroPoint + threshold.toDouble() / scale.toDouble() - 1e-9)
            return q.coerceIn(-128.0, 128.0).toInt()
        }
    }
}
