// Gated early-exit inference on Android over LiteRT (TFLite Interpreter API).
//
// One Interpreter per segment; direct ByteBuffers allocated once and reused.
// The loop mirrors keras_earlyexit/runtime/gated.py (GatedInterpreter._run)
// step for step; comments name the Python step. The manifest fields read here
// are those of keras_earlyexit/runtime/manifest.py (format_version 1).
package io.github.kerasearlyexit

import android.content.Context
import org.json.JSONObject
import org.tensorflow.lite.DataType
import org.tensorflow.lite.Interpreter
import org.tensorflow.lite.Tensor
import java.io.Closeable
import java.io.FileInputStream
import java.io.FileNotFoundException
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.MappedByteBuffer
import java.nio.channels.FileChannel
import java.security.MessageDigest
import kotlin.math.abs
import kotlin.math.floor

/** Result of one sample: class, 0-based exit index and its confidence. */
data class EarlyExitResult(val label: Int, val exitIndex: Int, val confidence: Float)

/** One input or output tensor entry of manifest.json. */
class TensorSpec(json: JSONObject) {
    val name: String = json.getString("name")
    val position: Int = json.getInt("position")
    val shape: IntArray = json.getJSONArray("shape").let { a -> IntArray(a.length()) { a.getInt(it) } }
    val dtype: String = json.getString("dtype")

    /** As in the manifest: quantized tensors have a scale, float ones null. */
    val quantized: Boolean = !json.isNull("scale")
    val scale: Float = if (quantized) json.getDouble("scale").toFloat() else 0f
    val zeroPoint: Int = if (json.isNull("zero_point")) 0 else json.getInt("zero_point")

    /** Elements of the tensor (batch of one included). */
    val elements: Int = shape.fold(1) { n, d -> n * d }

    /**
     * Integer inputs (token ids): the inclusive range of valid values, where
     * the exporter knows it (an embedding of n rows: [0, n - 1]); null otherwise.
     */
    val valueRange: IntRange? = if (json.isNull("value_range")) null else json.getJSONArray("value_range").let {
        require(it.length() == 2 && it.getLong(0) <= it.getLong(1) &&
            it.getLong(0) >= Int.MIN_VALUE && it.getLong(1) <= Int.MAX_VALUE) {
            "manifest.json gives tensor '$name' the value_range $it; [low, high] with low <= high was expected."
        }
        it.getInt(0)..it.getInt(1)
    }
}

/**
 * The classify calls both classifiers share. One sample is one array per
 * input, flattened, in the order of [inputNames] or by name: a FloatArray
 * for a float32 or int8 input (values on the training scale; int8 inputs
 * are quantized by the classifier) or an IntArray for an int32 input (token
 * ids, a padding mask). Every array is checked (count, type, size, NaN,
 * value range) before any buffer is written; a refused sample throws
 * IllegalArgumentException naming the input.
 */
abstract class GatedClassifier internal constructor() : Closeable {
    /** Names of the inputs [classify] takes, in order. */
    abstract val inputNames: List<String>

    /** "bundle" or "model", for messages. */
    internal abstract val kind: String

    /** Gated inference on one sample: one FloatArray per input (float models). */
    fun classify(vararg inputs: FloatArray): EarlyExitResult = classifySample(inputs)

    /** Gated inference on one sample: an IntArray or a FloatArray per input. */
    fun classify(vararg inputs: Any): EarlyExitResult = classifySample(inputs)

    /** [classify] with the inputs by name (see [inputNames]). */
    fun classify(inputs: Map<String, FloatArray>): EarlyExitResult = classifyNamed(inputs)

    /** [classify] with the inputs by name: IntArray or FloatArray values. */
    @JvmName("classifyValues")
    fun classify(inputs: Map<String, Any>): EarlyExitResult = classifyNamed(inputs)

    private fun classifyNamed(inputs: Map<String, Any>): EarlyExitResult {
        val missing = inputNames - inputs.keys
        require(missing.isEmpty()) { "Inputs lack $missing; the $kind's inputs are $inputNames." }
        val unknown = inputs.keys - inputNames
        require(unknown.isEmpty()) { "Inputs $unknown are not the $kind's; its inputs are $inputNames." }
        return classifySample(Array(inputNames.size) { inputs.getValue(inputNames[it]) })
    }

    /** One sample, one array per input in the order of [inputNames]. */
    protected abstract fun classifySample(inputs: Array<out Any>): EarlyExitResult
}

/**
 * Runs a keras-earlyexit bundle (segment_k.tflite + manifest.json in assets/).
 *
 * Inputs are float (on the training scale; quantized here for int8 models)
 * or int32 (token ids, padding masks, passed as they are). A bundle of the
 * criterion "patience" (PABEE) lets a sample leave an exit only when the
 * last [patience] exits predicted its class and its confidence passes the
 * exit's threshold (a floor).
 *
 * Loading checks the manifest's format version, each segment file's sha256,
 * and each tensor's position, dtype, size and quantization against the model,
 * so that a stale or partly copied bundle fails here with a message rather
 * than gating silently wrong. A failing constructor closes what it opened.
 *
 * Not thread safe: one classifier per thread (buffers are shared).
 *
 * @param assetDir folder under assets/ holding the bundle.
 * @param numThreads threads per Interpreter, >= 1.
 */
class EarlyExitClassifier(
    context: Context,
    assetDir: String,
    private val numThreads: Int = 1
) : GatedClassifier() {
    private class Segment(json: JSONObject, val interpreter: Interpreter) {
        val file: String = json.getString("file")
        val inputs = json.getJSONArray("inputs").let { a -> List(a.length()) { TensorSpec(a.getJSONObject(it)) } }
        val outputs = json.getJSONArray("outputs").let { a -> List(a.length()) { TensorSpec(a.getJSONObject(it)) } }
        val logits = output("logits")
        val confidence = output("confidence")
        private val gate: JSONObject = json.getJSONObject("gate")
        val manifestThreshold: Float = gate.getDouble("threshold").toFloat()
        val manifestThresholdQuantized: Int? =
            if (gate.isNull("threshold_quantized")) null else gate.getInt("threshold_quantized")

        // Buffers by position, allocated once. Input buffers may be replaced by
        // the previous segment's output buffers (carry without copying).
        val inputBuffers = arrayOfNulls<ByteBuffer>(inputs.size)
        val outputBuffers: Array<ByteBuffer>
        val outputMap: Map<Int, Any>

        // The inputBuffers as runForMultipleInputsOutputs takes them, built once.
        lateinit var inputArray: Array<Any>

        // (output of this segment, input of the next, requantize?)
        var carry: List<Triple<TensorSpec, TensorSpec, Boolean>> = emptyList()
        var threshold = 0f
        var thresholdQuantized = NEVER_QUANTIZED

        init {
            interpreter.allocateTensors()
            checkPositions("input", inputs, interpreter.inputTensorCount, exact = true)
            checkPositions("output", outputs, interpreter.outputTensorCount, exact = false)
            // The manifest must describe the model: read it back from the
            // tensors, so a stale manifest fails here, not silently.
            for (t in inputs) checkTensor(t, interpreter.getInputTensor(t.position))
            for (t in outputs) checkTensor(t, interpreter.getOutputTensor(t.position))
            outputBuffers = Array(interpreter.outputTensorCount) { direct(interpreter.getOutputTensor(it).numBytes()) }
            outputMap = outputBuffers.withIndex().associate { it.index to it.value as Any }
        }

        fun output(name: String): TensorSpec = outputs.firstOrNull { it.name == name }
            ?: throw IllegalArgumentException(
                "Segment $file has no output '$name'; it has ${outputs.map { it.name }}. " +
                    "The bundle was not written by this version of keras-earlyexit: convert again."
            )

        private fun checkPositions(role: String, specs: List<TensorSpec>, count: Int, exact: Boolean) {
            val positions = specs.map { it.position }
            val valid = positions.all { it in 0 until count } && positions.toSet().size == positions.size &&
                (!exact || positions.size == count)
            if (!valid) {
                throw IllegalArgumentException(
                    "manifest.json lists the ${role}s of $file at positions $positions; the model has $count " +
                        "${role}s. Copy the whole bundle again."
                )
            }
        }

        private fun checkTensor(t: TensorSpec, tensor: Tensor) {
            val dtype = DTYPES[t.dtype] ?: throw IllegalArgumentException(
                "Tensor '${t.name}' of $file has dtype ${t.dtype}; this classifier runs float32, int8 and " +
                    "int32 tensors. Convert with quantization \"int8\", \"float16\", \"dynamic\" or " +
                    "\"float32\" (integer inputs as int32)."
            )
            val q = tensor.quantizationParams()
            val sameQuantization = !t.quantized ||
                (abs(q.scale - t.scale) <= 1e-6f * t.scale && q.zeroPoint == t.zeroPoint)
            if (tensor.dataType() != dtype || tensor.numBytes() != t.elements * dtype.byteSize() || !sameQuantization) {
                throw IllegalArgumentException(
                    "manifest.json says tensor '${t.name}' of $file is ${t.dtype} of shape ${t.shape.toList()} " +
                        "(scale ${t.scale}, zero point ${t.zeroPoint}); the model has ${tensor.dataType()} of " +
                        "${tensor.numBytes()} bytes (scale ${q.scale}, zero point ${q.zeroPoint}). " +
                        "Copy the whole bundle again."
                )
            }
        }
    }

    private val segments: List<Segment>
    val exitNames: List<String>
    val numClasses: Int
    val exitCounts: IntArray

    override val inputNames: List<String>
    override val kind = "bundle"

    /**
     * Criterion "patience": how many exits in a row must predict a sample's
     * class before it leaves (1 to [numExits]; the manifest's until
     * [setPatience]); 0 for the other criteria.
     */
    var patience: Int
        private set
    private val patienceCriterion: Boolean
    private var closed = false

    init {
        require(numThreads >= 1) { "numThreads must be >= 1. Received: $numThreads" }
        val manifest = JSONObject(context.assets.open("$assetDir/manifest.json").bufferedReader().use { it.readText() })
        if (manifest.optString("format") != "keras-earlyexit-tflite" || manifest.optInt("format_version") != 1) {
            throw IllegalArgumentException(
                "assets/$assetDir/manifest.json is not a keras-earlyexit bundle of format_version 1; " +
                    "export it with kee.export.to_tflite of a matching version."
            )
        }
        val entries = manifest.getJSONArray("segments")
        exitNames = manifest.getJSONArray("exit_names").let { a -> List(a.length()) { a.getString(it) } }
        numClasses = manifest.getInt("num_classes")
        require(entries.length() >= 1 && exitNames.size == entries.length()) {
            "assets/$assetDir/manifest.json lists ${entries.length()} segments and ${exitNames.size} exit " +
                "names; convert again."
        }
        patience = readPatience(manifest, entries.length(), "assets/$assetDir/manifest.json")
        patienceCriterion = patience > 0
        val opened = ArrayList<Segment>(entries.length())
        try {
            for (k in 0 until entries.length()) {
                val json = entries.getJSONObject(k)
                val path = "$assetDir/${json.getString("file")}"
                val model = mapAsset(context, path)
                verifySha256(model, json.getString("sha256"), path)
                val interpreter = Interpreter(model, Interpreter.Options().setNumThreads(numThreads))
                try {
                    opened.add(Segment(json, interpreter))
                } catch (e: Throwable) {
                    interpreter.close()
                    throw e
                }
            }
            connect(opened)
        } catch (e: Throwable) {
            for (segment in opened) segment.interpreter.close()
            throw e
        }
        segments = opened
        inputNames = segments[0].inputs.map { it.name }
        exitCounts = IntArray(segments.size)
    }

    /** Buffers, carries and the manifest's thresholds; throws before any is used. */
    private fun connect(segments: List<Segment>) {
        for (segment in segments) {
            require(segment.logits.elements == numClasses) {
                "Segment ${segment.file} has ${segment.logits.elements} logits; manifest.json says " +
                    "num_classes is $numClasses. Copy the whole bundle again."
            }
            for (t in listOf(segment.logits, segment.confidence)) {
                require(t.dtype == "float32" || t.dtype == "int8") {
                    "Output '${t.name}' of ${segment.file} is ${t.dtype}; exits output float32 or int8 logits " +
                        "and confidence. Convert again."
                }
            }
        }
        // Segment 1 reads the sample from its own buffers.
        val first = segments[0]
        for (t in first.inputs) {
            first.inputBuffers[t.position] = direct(first.interpreter.getInputTensor(t.position).numBytes())
        }
        // gated.py __init__: carry pairs, requantize where parameters differ.
        for (k in 1 until segments.size) {
            val previous = segments[k - 1]
            val next = segments[k]
            previous.carry = next.inputs.map { target ->
                val source = previous.output(target.name)
                require(source.dtype == target.dtype && source.elements == target.elements) {
                    "Carry '${target.name}' is ${source.dtype} of ${source.elements} elements out of " +
                        "${previous.file} but ${target.dtype} of ${target.elements} elements into ${next.file}. " +
                        "Copy the whole bundle again."
                }
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
        // int8 bundles take the quantized thresholds the manifest gives
        // (computed once, in Python); they are never recomputed here.
        for ((k, segment) in segments.withIndex()) {
            if (k == segments.size - 1) break
            segment.threshold = segment.manifestThreshold
            require(segment.threshold in 0f..1f) {
                "manifest.json gives exit ${k + 1} the threshold ${segment.threshold}; thresholds are in [0, 1]."
            }
            if (segment.confidence.quantized) {
                segment.thresholdQuantized = segment.manifestThresholdQuantized ?: throw IllegalArgumentException(
                    "manifest.json gives exit ${k + 1} (${segment.file}) no threshold_quantized, which int8 " +
                        "bundles need; convert again."
                )
            }
        }
    }

    val numExits: Int get() = segments.size

    /** The current thresholds, one per non-final exit. */
    val thresholds: FloatArray get() = FloatArray(segments.size - 1) { segments[it].threshold }

    /**
     * Sets one threshold per non-final exit, in [0, 1]; 1 means no sample
     * leaves there. int8 bundles compare the int8 confidence with
     * [quantizeThreshold] of each threshold.
     */
    fun setThresholds(thresholds: FloatArray) {
        require(thresholds.size == segments.size - 1 && thresholds.all { it in 0f..1f }) {
            "Expected ${segments.size - 1} thresholds in [0, 1] (one per non-final exit); " +
                "received ${thresholds.toList()}."
        }
        for ((k, t) in thresholds.withIndex()) {
            val segment = segments[k]
            segment.threshold = t
            val c = segment.confidence
            if (c.quantized) segment.thresholdQuantized = quantizeThreshold(t, c.scale, c.zeroPoint)
        }
    }

    /**
     * Sets the patience of a bundle exported with criterion "patience": an
     * int in [1, [numExits]] (1: the thresholds alone decide). The manifest
     * stays as it is.
     */
    fun setPatience(patience: Int) {
        require(patienceCriterion) {
            "setPatience applies to bundles exported with criterion '$PATIENCE'; this one has another."
        }
        require(patience in 1..numExits) {
            "patience must be in [1, $numExits] (the number of exits in a row that must agree). " +
                "Received: $patience"
        }
        this.patience = patience
    }

    override fun classifySample(inputs: Array<out Any>): EarlyExitResult {
        check(!closed) { "The classifier is closed." }
        // gated.py _prepare: check every input, then quantize int8 ones with
        // the manifest's parameters.
        val specs = segments[0].inputs
        require(inputs.size == specs.size) {
            "The bundle takes ${specs.size} input(s) $inputNames; received ${inputs.size} array(s)."
        }
        for ((spec, input) in specs.zip(inputs)) checkInput(spec, input)
        for ((spec, input) in specs.zip(inputs)) {
            putInput(segments[0].inputBuffers[spec.position]!!, spec.dtype, input, spec.scale, spec.zeroPoint)
        }
        return run()
    }

    private fun run(): EarlyExitResult {
        val last = segments.size - 1
        // Patience: the previous exit's class and how many exits in a row,
        // up to this one, predicted it (runtime/patience.py next_streak).
        var previousLabel = -1
        var streak = 0
        for ((k, segment) in segments.withIndex()) {
            // gated.py: runner.set_input(...) (buffers already hold the sample or carry).
            for (b in segment.inputArray) (b as ByteBuffer).rewind()
            for (b in segment.outputBuffers) b.rewind()
            // gated.py: runner.invoke()
            segment.interpreter.runForMultipleInputsOutputs(segment.inputArray, segment.outputMap)
            // gated.py: confidence = runner.get_output(segment.confidence)
            val c = segment.confidence
            val out = segment.outputBuffers[c.position]
            // The gate rule: float32(confidence) >= float32(threshold), never
            // at a threshold of 1 (an int8 threshold of 128 is never reached).
            val confident = if (c.quantized) {
                out.get(0).toInt() >= segment.thresholdQuantized
            } else {
                segment.threshold < 1f && out.getFloat(0) >= segment.threshold
            }
            val label = argmax(segment.logits, segment.outputBuffers[segment.logits.position])
            if (patience > 0) {
                streak = if (label == previousLabel) streak + 1 else 1
                previousLabel = label
            }
            // patience.py patience_passes: the streak reaches p and the
            // confidence passes the floor.
            val patient = patience == 0 || streak >= patience
            if (k == last || (patient && confident)) {
                val confidence = if (c.quantized) (out.get(0) - c.zeroPoint) * c.scale else out.getFloat(0)
                exitCounts[k]++
                return EarlyExitResult(label, k, confidence)
            }
            // gated.py: collect the carry; requantize where needed. Carries with
            // equal parameters are already the next segment's input buffers.
            for ((source, target, requantize) in segment.carry) {
                if (!requantize) continue
                val from = segment.outputBuffers[source.position]
                val to = segments[k + 1].inputBuffers[target.position]!!
                for (i in 0 until source.elements) {
                    to.put(i, quantize((from.get(i) - source.zeroPoint) * source.scale, target.scale, target.zeroPoint))
                }
            }
        }
        throw IllegalStateException("unreachable: the final exit takes every sample")
    }

    override fun close() {
        if (closed) return
        closed = true
        for (segment in segments) segment.interpreter.close()
    }

    private fun argmax(spec: TensorSpec, buffer: ByteBuffer): Int {
        // First maximum on ties, as numpy.argmax.
        var best = 0
        if (spec.quantized) {
            for (i in 1 until spec.elements) if (buffer.get(i) > buffer.get(best)) best = i
        } else {
            for (i in 1 until spec.elements) if (buffer.getFloat(4 * i) > buffer.getFloat(4 * best)) best = i
        }
        return best
    }

    companion object {
        /** An int8 threshold above every int8 value: no sample leaves. */
        const val NEVER_QUANTIZED = 128

        private val DTYPES = mapOf("float32" to DataType.FLOAT32, "int8" to DataType.INT8, "int32" to DataType.INT32)

        /** The gate criterion whose exits also need agreeing classes (runtime/manifest.py PATIENCE). */
        const val PATIENCE = "patience"

        /**
         * The manifest's patience: an integer in [1, numExits] for criterion
         * "patience", 0 for the others (whose patience must be null or absent).
         */
        internal fun readPatience(manifest: JSONObject, numExits: Int, source: String): Int {
            val criterion = manifest.getString("criterion")
            if (criterion != PATIENCE) {
                require(manifest.isNull("patience")) {
                    "$source gives patience ${manifest.opt("patience")} for criterion '$criterion'; only " +
                        "criterion '$PATIENCE' has one. Export the model again."
                }
                return 0
            }
            val value = manifest.opt("patience")
            require(value is Int && value in 1..numExits) {
                "$source has criterion '$PATIENCE' with patience $value; an integer in [1, $numExits] (the " +
                    "number of exits) was expected. Export the model again."
            }
            return value
        }

        /**
         * Checks one input array against its tensor before anything is
         * written: float32 and int8 inputs take a FloatArray of finite
         * values, int32 inputs an IntArray within the tensor's value range;
         * both of the tensor's number of elements.
         */
        internal fun checkInput(spec: TensorSpec, input: Any) {
            val shape = spec.shape.toList()
            if (spec.dtype == "int32") {
                require(input is IntArray) {
                    "Input '${spec.name}' takes ${spec.elements} int32 values (shape $shape) as an IntArray; " +
                        "received ${describe(input)}."
                }
                require(input.size == spec.elements) {
                    "Input '${spec.name}' takes ${spec.elements} int32 values (shape $shape); received ${input.size}."
                }
                val range = spec.valueRange ?: return
                val bad = input.indexOfFirst { it !in range }
                require(bad < 0) {
                    "Input '${spec.name}' holds ${input[bad]} at element $bad; its values are in " +
                        "[${range.first}, ${range.last}] (e.g. token ids of an embedding of ${range.last + 1} rows)."
                }
                return
            }
            require(input is FloatArray) {
                "Input '${spec.name}' takes ${spec.elements} floats (shape $shape) as a FloatArray; " +
                    "received ${describe(input)}."
            }
            require(input.size == spec.elements) {
                "Input '${spec.name}' takes ${spec.elements} floats (shape $shape); received ${input.size}."
            }
            val bad = input.indexOfFirst { it.isNaN() || it.isInfinite() }
            require(bad < 0) {
                "Input '${spec.name}' holds ${input[bad]} at element $bad; the model takes finite floats on " +
                    "the scale it was trained on."
            }
        }

        private fun describe(input: Any): String = when (input) {
            is FloatArray -> "a FloatArray of ${input.size}"
            is IntArray -> "an IntArray of ${input.size}"
            else -> "a ${input.javaClass.simpleName}"
        }

        /** Writes a checked input (see [checkInput]) into its buffer: int8 quantized, int32 and float32 as they are. */
        internal fun putInput(buffer: ByteBuffer, dtype: String, input: Any, scale: Float, zeroPoint: Int) {
            when (dtype) {
                "int32" -> for ((i, x) in (input as IntArray).withIndex()) buffer.putInt(4 * i, x)
                "int8" -> for ((i, x) in (input as FloatArray).withIndex()) buffer.put(i, quantize(x, scale, zeroPoint))
                else -> for ((i, x) in (input as FloatArray).withIndex()) buffer.putFloat(4 * i, x)
            }
        }

        internal fun direct(bytes: Int): ByteBuffer = ByteBuffer.allocateDirect(bytes).order(ByteOrder.nativeOrder())

        /** Maps assets/[path] read-only; [missing] ends the message if it cannot be opened. */
        internal fun mapAsset(
            context: Context,
            path: String,
            missing: String = "Copy the whole bundle again."
        ): MappedByteBuffer {
            // The mapping stays valid once the descriptor and stream are closed.
            val descriptor = try {
                context.assets.openFd(path)
            } catch (e: FileNotFoundException) {
                throw IllegalArgumentException(
                    "assets/$path cannot be opened as a file descriptor: it is missing, or compressed in the " +
                        "APK (add androidResources { noCompress += \"tflite\" }). $missing",
                    e
                )
            }
            return descriptor.use { fd ->
                FileInputStream(fd.fileDescriptor).use {
                    it.channel.map(FileChannel.MapMode.READ_ONLY, fd.startOffset, fd.declaredLength)
                }
            }
        }

        private fun verifySha256(model: ByteBuffer, expected: String, path: String) {
            val digest = MessageDigest.getInstance("SHA-256").apply { update(model.duplicate()) }.digest()
            val actual = digest.joinToString("") { "%02x".format(it) }
            require(actual == expected) {
                "assets/$path is corrupted or was replaced: its sha256 is ${actual.take(16)}..., " +
                    "manifest.json expects ${expected.take(16)}... Copy the whole bundle again."
            }
        }

        /** Float to int8 as TFLite's QUANTIZE (round half away from zero); gated.py quantize. */
        fun quantize(x: Float, scale: Float, zeroPoint: Int): Byte {
            val v = x / scale
            val r = if (v >= 0f) floor(v + 0.5f) else -floor(-v + 0.5f)
            return (r + zeroPoint).coerceIn(-128f, 127f).toInt().toByte()
        }

        /**
         * The int8 threshold for [threshold]: the smallest q in [-128, 127]
         * with float32(q - zeroPoint) * scale >= threshold, or
         * [NEVER_QUANTIZED] if there is none or threshold >= 1. The same
         * integer scan in float32 as manifest.quantize_threshold in Python.
         */
        fun quantizeThreshold(threshold: Float, scale: Float, zeroPoint: Int): Int {
            if (!(threshold < 1f)) return NEVER_QUANTIZED
            for (q in -128..127) if ((q - zeroPoint).toFloat() * scale >= threshold) return q
            return NEVER_QUANTIZED
        }
    }
}
