// Gated early-exit inference on Android with a fused keras-earlyexit model:
// one .tflite file whose own graph gates itself (TFLite IF), so one
// runForMultipleInputsOutputs call per sample. Loading mirrors
// keras_earlyexit/runtime/fused.py (read_fused_manifest); the manifest
// fields read are those of its FusedManifest (format_version 1).
package io.github.kerasearlyexit

import android.content.Context
import org.json.JSONException
import org.json.JSONObject
import org.tensorflow.lite.DataType
import org.tensorflow.lite.Interpreter
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.security.MessageDigest
import kotlin.math.abs

/**
 * Runs a fused keras-earlyexit model from assets/: the file written by
 * `kee.export.to_tflite(model, "model.tflite", fused=True)`.
 *
 * One `runForMultipleInputsOutputs` call per sample: the graph runs only the
 * segments the sample needs and returns its class, exit index and
 * confidence. Inputs and outputs are found by name (the signature names
 * `class`, `exit_index`, `confidence`, `logits`) and checked against the
 * manifest embedded in the file as TFLite metadata. Loading checks, as the
 * Python runtime does, the manifest's format version, the file's sha256 (so
 * any changed byte fails) and that the graph's threshold constants are the
 * manifest's. A failing constructor closes what it opened.
 *
 * Inputs are float (on the training scale; quantized here for int8 models)
 * or int32 (token ids, padding masks, passed as they are). For the
 * criterion "patience" the graph itself keeps each sample's streak of
 * agreeing exits; [patience] reports p.
 *
 * The thresholds are constants of the graph: [thresholds] reports them.
 * Change them offline with `kee.export.set_thresholds("model.tflite",
 * [...])`, which rewrites the file (constants, manifest and hash), and ship
 * the new file.
 *
 * Not thread safe: one classifier per thread (buffers are shared).
 *
 * @param assetPath the `.tflite` file under assets/.
 * @param numThreads threads of the Interpreter, >= 1.
 */
class FusedEarlyExitClassifier(
    context: Context,
    assetPath: String,
    numThreads: Int = 1
) : GatedClassifier() {
    /** Exit names, shallow to deep; [EarlyExitResult.exitIndex] indexes them. */
    val exitNames: List<String>
    val numClasses: Int

    /** "int8", "float16", "dynamic" or "float32", as exported. */
    val quantization: String

    override val inputNames: List<String>
    override val kind = "model"

    /** Samples per exit so far. */
    val exitCounts: IntArray

    /**
     * Criterion "patience": how many exits in a row must predict a sample's
     * class before it leaves (a constant of the graph, like the thresholds);
     * 0 for the other criteria.
     */
    val patience: Int

    /**
     * The taken exit's logits for the last sample, if the file outputs them
     * (`to_tflite(..., fused=True, logits=True)`); null otherwise.
     */
    val logits: FloatArray?

    private val manifestThresholds: FloatArray
    private val manifestThresholdsQuantized: IntArray?
    private val interpreter: Interpreter
    private val io: Io
    private var closed = false

    init {
        require(numThreads >= 1) { "numThreads must be >= 1. Received: $numThreads" }
        val source = "assets/$assetPath"
        val missing = "Copy the .tflite file written by kee.export.to_tflite(..., fused=True) into assets/."
        val model = EarlyExitClassifier.mapAsset(context, assetPath, missing)
        val manifest = readManifest(model, source)
        exitNames = manifest.stringList("exit_names")
        numClasses = manifest.getInt("num_classes")
        quantization = manifest.getString("quantization")
        val exits = manifest.getJSONArray("exits").let { a -> List(a.length()) { a.getJSONObject(it) } }
        require(exits.size >= 1 && exits.size == exitNames.size) {
            "The manifest of $source lists ${exits.size} exits and ${exitNames.size} exit names. $EXPORT_AGAIN"
        }
        val gated = exits.dropLast(1)
        manifestThresholds = FloatArray(gated.size) { gated[it].getJSONObject("gate").getDouble("threshold").toFloat() }
        manifestThresholdsQuantized = if (gated.any { !it.isNull("confidence_scale") }) {
            IntArray(gated.size) { k ->
                val gate = gated[k].getJSONObject("gate")
                require(!gate.isNull("threshold_quantized")) {
                    "Exit $k of the int8 model $source has no threshold_quantized. $EXPORT_AGAIN"
                }
                gate.getInt("threshold_quantized")
            }
        } else {
            null
        }
        patience = EarlyExitClassifier.readPatience(manifest, exits.size, source)
        checkThresholdConstants(FlatModel(model, source), gated, patience, source)
        val specs = manifest.getJSONArray("inputs").let { a -> List(a.length()) { TensorSpec(a.getJSONObject(it)) } }
        val outputs = manifest.stringList("outputs")
        val opened = Interpreter(model, Interpreter.Options().setNumThreads(numThreads))
        io = try {
            Io(opened, specs, outputs, source)
        } catch (e: Throwable) {
            opened.close()
            throw e
        }
        interpreter = opened
        inputNames = specs.map { it.name }
        exitCounts = IntArray(exits.size)
        logits = if (io.logits != null) FloatArray(numClasses) else null
    }

    val numExits: Int get() = exitNames.size

    /** The file's thresholds, one per non-final exit (read only: see the class). */
    val thresholds: FloatArray get() = manifestThresholds.copyOf()

    /**
     * For int8 files, the int8 thresholds the graph compares the int8
     * confidence with (128: no sample leaves there); null for float files.
     */
    val thresholdsQuantized: IntArray? get() = manifestThresholdsQuantized?.copyOf()

    /** The model's tensors, by name, and their buffers (allocated once). */
    private inner class Io(interpreter: Interpreter, specs: List<TensorSpec>, outputs: List<String>, source: String) {
        val specs: List<TensorSpec> = specs
        val inputBuffers: Array<ByteBuffer>
        val inputArray: Array<Any>
        val inputScale: FloatArray
        val inputZeroPoint: IntArray
        val label: ByteBuffer
        val exitIndex: ByteBuffer
        val confidence: ByteBuffer
        val logits: ByteBuffer?
        val outputMap: Map<Int, Any>

        init {
            interpreter.allocateTensors()
            require(interpreter.inputTensorCount == specs.size) {
                "$source has ${interpreter.inputTensorCount} inputs; its manifest lists ${specs.size}. $EXPORT_AGAIN"
            }
            val indices = specs.map { spec ->
                val index = index(source, "input", spec.name) { interpreter.getInputIndex(it) }
                require(index == spec.position) {
                    "Input '${spec.name}' of $source is at position $index; its manifest says ${spec.position}. " +
                        EXPORT_AGAIN
                }
                checkInput(spec, interpreter, index, source)
                index
            }
            require(indices.toSet().size == indices.size) {
                "The manifest of $source lists the inputs ${specs.map { it.name }} twice. $EXPORT_AGAIN"
            }
            // Buffers in the manifest's order; the call takes them in the model's.
            inputBuffers = Array(specs.size) { EarlyExitClassifier.direct(interpreter.getInputTensor(indices[it]).numBytes()) }
            val byIndex = arrayOfNulls<Any>(specs.size)
            for ((i, index) in indices.withIndex()) byIndex[index] = inputBuffers[i]
            inputArray = Array(specs.size) { byIndex[it]!! }
            // The model's own quantization of each input (checked equal to the manifest's).
            val params = indices.map { interpreter.getInputTensor(it).quantizationParams() }
            inputScale = FloatArray(specs.size) { params[it].scale }
            inputZeroPoint = IntArray(specs.size) { params[it].zeroPoint }

            require(interpreter.outputTensorCount == outputs.size) {
                "$source has ${interpreter.outputTensorCount} outputs; its manifest lists $outputs. $EXPORT_AGAIN"
            }
            val map = HashMap<Int, Any>()
            fun output(name: String, dtype: DataType, elements: Int): ByteBuffer {
                val index = index(source, "output", name) { interpreter.getOutputIndex(it) }
                require(index == outputs.indexOf(name)) {
                    "Output '$name' of $source is at position $index; its manifest lists the outputs $outputs. " +
                        EXPORT_AGAIN
                }
                val tensor = interpreter.getOutputTensor(index)
                require(tensor.dataType() == dtype && tensor.numBytes() == elements * dtype.byteSize()) {
                    "Output '$name' of $source is ${tensor.dataType()} of ${tensor.numBytes()} bytes; a fused " +
                        "model outputs $elements $dtype value(s). $EXPORT_AGAIN"
                }
                return EarlyExitClassifier.direct(tensor.numBytes()).also { map[index] = it }
            }
            for (name in REQUIRED_OUTPUTS) {
                require(name in outputs) {
                    "The manifest of $source lists the outputs $outputs; a fused model has $REQUIRED_OUTPUTS. " +
                        EXPORT_AGAIN
                }
            }
            label = output("class", DataType.INT32, 1)
            exitIndex = output("exit_index", DataType.INT32, 1)
            confidence = output("confidence", DataType.FLOAT32, 1)
            logits = if ("logits" in outputs) output("logits", DataType.FLOAT32, numClasses) else null
            outputMap = map
        }
    }

    override fun classifySample(inputs: Array<out Any>): EarlyExitResult {
        check(!closed) { "The classifier is closed." }
        val specs = io.specs
        require(inputs.size == specs.size) {
            "The model takes ${specs.size} input(s) $inputNames; received ${inputs.size} array(s)."
        }
        // Every input is checked before any buffer is written.
        for ((spec, input) in specs.zip(inputs)) EarlyExitClassifier.checkInput(spec, input)
        for ((i, input) in inputs.withIndex()) {
            val buffer = io.inputBuffers[i]
            // int8 inputs: the model's own parameters (checked equal to the manifest's).
            EarlyExitClassifier.putInput(buffer, specs[i].dtype, input, io.inputScale[i], io.inputZeroPoint[i])
            buffer.rewind()
        }
        for (b in io.outputMap.values) (b as ByteBuffer).rewind()
        interpreter.runForMultipleInputsOutputs(io.inputArray, io.outputMap)
        val label = io.label.getInt(0)
        val exitIndex = io.exitIndex.getInt(0)
        check(exitIndex in 0 until numExits && label in 0 until numClasses) {
            "The model returned class $label at exit $exitIndex; it has $numClasses classes and $numExits exits."
        }
        val out = logits
        if (out != null) for (j in out.indices) out[j] = io.logits!!.getFloat(4 * j)
        exitCounts[exitIndex]++
        return EarlyExitResult(label, exitIndex, io.confidence.getFloat(0))
    }

    override fun close() {
        if (closed) return
        closed = true
        interpreter.close()
    }

    companion object {
        /** Name of the TFLite metadata entry holding the manifest (runtime/fused.py METADATA_NAME). */
        const val METADATA_NAME = "keras_earlyexit"

        /** What a float graph compares with for a threshold of 1 (runtime/fused.py FLOAT_NEVER). */
        const val FLOAT_NEVER = 2f

        private const val FORMAT = "keras-earlyexit-fused"
        private const val FORMAT_VERSION = 1
        private const val HASH_LENGTH = 64
        private val HASH_KEY = "\"content_sha256\":\"".toByteArray(Charsets.US_ASCII)
        private val REQUIRED_OUTPUTS = listOf("class", "exit_index", "confidence")
        private const val EXPORT_AGAIN = "Export it again with kee.export.to_tflite(..., fused=True)."
        private val INPUT_DTYPES = mapOf("float32" to DataType.FLOAT32, "int8" to DataType.INT8, "int32" to DataType.INT32)

        private fun JSONObject.stringList(key: String): List<String> =
            getJSONArray(key).let { a -> List(a.length()) { a.getString(it) } }

        private inline fun index(source: String, role: String, name: String, find: (String) -> Int): Int = try {
            find(name)
        } catch (e: IllegalArgumentException) {
            throw IllegalArgumentException("$source has no $role named '$name'. $EXPORT_AGAIN", e)
        }

        private fun checkInput(spec: TensorSpec, interpreter: Interpreter, index: Int, source: String) {
            val dtype = INPUT_DTYPES[spec.dtype] ?: throw IllegalArgumentException(
                "Input '${spec.name}' of $source is ${spec.dtype}; this classifier takes float32 inputs, int8 " +
                    "(quantized here) and int32 (token ids, masks). $EXPORT_AGAIN"
            )
            val tensor = interpreter.getInputTensor(index)
            val q = tensor.quantizationParams()
            val sameQuantization = !spec.quantized ||
                (abs(q.scale - spec.scale) <= 1e-6f * spec.scale && q.zeroPoint == spec.zeroPoint)
            require(tensor.dataType() == dtype && tensor.numBytes() == spec.elements * dtype.byteSize() &&
                sameQuantization) {
                "The manifest of $source says input '${spec.name}' is ${spec.dtype} of shape " +
                    "${spec.shape.toList()} (scale ${spec.scale}, zero point ${spec.zeroPoint}); the model has " +
                    "${tensor.dataType()} of ${tensor.numBytes()} bytes (scale ${q.scale}, zero point " +
                    "${q.zeroPoint}). $EXPORT_AGAIN"
            }
        }

        /**
         * The embedded manifest, checked: format and version, and the file's
         * sha256 with its own 64 hash characters read as zeros (as
         * runtime/fused.py content_sha256 computes it).
         */
        private fun readManifest(model: ByteBuffer, source: String): JSONObject {
            val flat = FlatModel(model, source)
            val buffer = flat.metadataBuffer(METADATA_NAME) ?: throw IllegalArgumentException(
                "$source has no '$METADATA_NAME' metadata: it is not a fused model written by keras-earlyexit " +
                    "(or its metadata was removed). Write one with kee.export.to_tflite(model, " +
                    "\"model.tflite\", fused=True); a bundle folder runs with EarlyExitClassifier."
            )
            val (start, length) = flat.buffer(buffer)
            val text = ByteArray(length).also { model.duplicate().apply { position(start) }.get(it) }
            val json = try {
                JSONObject(String(text, Charsets.UTF_8))
            } catch (e: JSONException) {
                throw IllegalArgumentException(
                    "The '$METADATA_NAME' metadata of $source is not valid JSON: the file is damaged. $EXPORT_AGAIN",
                    e
                )
            }
            require(json.optString("format") == FORMAT) {
                "The '$METADATA_NAME' metadata of $source is not a fused-model manifest (format '$FORMAT' expected)."
            }
            val version = json.opt("format_version")
            require(version == FORMAT_VERSION) {
                "$source has fused format_version $version; this classifier reads version $FORMAT_VERSION. " +
                    "Export the model again with a matching keras-earlyexit."
            }
            val at = hashOffset(text, source)
            val digest = MessageDigest.getInstance("SHA-256")
            digest.update(slice(model, 0, start + at))
            digest.update(ByteArray(HASH_LENGTH) { '0'.toByte() })
            digest.update(slice(model, start + at + HASH_LENGTH, model.limit()))
            val actual = digest.digest().joinToString("") { "%02x".format(it) }
            val expected = json.getString("content_sha256")
            require(actual == expected) {
                "$source was modified after export: its sha256 (own hash excluded) is ${actual.take(16)}..., " +
                    "its manifest expects ${expected.take(16)}... Change thresholds only with " +
                    "kee.export.set_thresholds; otherwise copy or export the file again."
            }
            return json
        }

        /** Where the value of the manifest's single content_sha256 entry starts in [text]. */
        private fun hashOffset(text: ByteArray, source: String): Int {
            val found = (0..text.size - HASH_KEY.size).filter { i ->
                HASH_KEY.indices.all { text[i + it] == HASH_KEY[it] }
            }
            require(found.size == 1 && found[0] + HASH_KEY.size + HASH_LENGTH <= text.size) {
                "The manifest of $source has no single content_sha256 entry: its metadata was altered. $EXPORT_AGAIN"
            }
            return found[0] + HASH_KEY.size
        }

        private fun slice(model: ByteBuffer, from: Int, to: Int): ByteBuffer =
            model.duplicate().apply {
                limit(to)
                position(from)
            }

        /**
         * The graph's threshold constants are those the manifest names:
         * int8 files hold threshold_quantized (int32), float files
         * float32(threshold), or [FLOAT_NEVER] for 1 (runtime/fused.py
         * gate_constant); with patience, each gate's patience_buffer holds
         * float32(patience).
         */
        private fun checkThresholdConstants(flat: FlatModel, gated: List<JSONObject>, patience: Int, source: String) {
            for ((k, exit) in gated.withIndex()) {
                val gate = exit.getJSONObject("gate")
                val threshold = gate.getDouble("threshold").toFloat()
                require(threshold in 0f..1f) {
                    "The manifest of $source gives exit $k the threshold $threshold; thresholds are in [0, 1]."
                }
                val (start, length) = flat.buffer(exit.getInt("threshold_buffer"))
                require(length == 4) {
                    "Exit $k's threshold buffer in $source holds $length bytes; a 4-byte scalar was expected. " +
                        EXPORT_AGAIN
                }
                val stored = flat.bytes.duplicate().order(ByteOrder.LITTLE_ENDIAN)
                val quantized = !exit.isNull("confidence_scale")
                val matches = if (quantized) {
                    stored.getInt(start) == gate.getInt("threshold_quantized")
                } else {
                    stored.getFloat(start) == (if (threshold < 1f) threshold else FLOAT_NEVER)
                }
                require(matches) {
                    "Exit $k's gate in $source does not compare with the threshold its manifest names " +
                        "($threshold). $EXPORT_AGAIN"
                }
                if (patience > 0) {
                    require(!exit.isNull("patience_buffer")) {
                        "Exit $k of $source has no patience_buffer, which criterion 'patience' needs. $EXPORT_AGAIN"
                    }
                    val (at, size) = flat.buffer(exit.getInt("patience_buffer"))
                    require(size == 4 && stored.getFloat(at) == patience.toFloat()) {
                        "Exit $k's gate in $source does not compare with the patience its manifest names " +
                            "($patience). $EXPORT_AGAIN"
                    }
                }
            }
        }
    }
}

/**
 * The two tables of a TFLite flatbuffer this runner reads: Model.buffers and
 * Model.metadata (tensorflow/compiler/mlir/lite/schema/schema.fbs). Every
 * offset is checked against the file's size, so a damaged file gives an
 * IllegalArgumentException, never a read outside it.
 */
internal class FlatModel(model: ByteBuffer, private val source: String) {
    val bytes: ByteBuffer = model.duplicate().order(ByteOrder.LITTLE_ENDIAN)
    private val root: Int

    init {
        val identifier = if (bytes.limit() >= 8) ByteArray(4) { bytes.get(4 + it) } else ByteArray(0)
        require(String(identifier, Charsets.US_ASCII) == "TFL3") {
            "$source is not a TFLite model (no 'TFL3' file identifier)."
        }
        root = deref(0)
    }

    /** The buffer index of metadata entry [name], or null if there is none. */
    fun metadataBuffer(name: String): Int? {
        val (start, count) = vector(root, MODEL_METADATA, 4) ?: return null
        for (i in 0 until count) {
            val entry = deref(start + 4 * i)
            val nameField = field(entry, METADATA_NAME_FIELD)
            if (nameField == 0) continue
            val text = deref(nameField)
            val length = u32(text)
            within(text + 4, length)
            val entryName = ByteArray(length) { bytes.get(text + 4 + it) }
            if (String(entryName, Charsets.UTF_8) == name) {
                val buffer = field(entry, METADATA_BUFFER_FIELD)
                return if (buffer == 0) 0 else u32(buffer)
            }
        }
        return null
    }

    /** (start, length) of buffer [index]'s data in the file. */
    fun buffer(index: Int): Pair<Int, Int> {
        val (start, count) = vector(root, MODEL_BUFFERS, 4) ?: (0 to 0)
        require(index in 0 until count) {
            "$source has no buffer $index; its manifest does not match the graph. Export it again."
        }
        return vector(deref(start + 4 * index), BUFFER_DATA, 1) ?: (0 to 0)
    }

    private fun within(at: Int, size: Int) {
        require(at >= 0 && size >= 0 && at <= bytes.limit() - size) {
            "$source is damaged: an offset points outside the file. Copy or export it again."
        }
    }

    private fun u32(at: Int): Int {
        within(at, 4)
        return bytes.getInt(at)
    }

    private fun u16(at: Int): Int {
        within(at, 2)
        return bytes.getShort(at).toInt() and 0xffff
    }

    /** The table or vector an unsigned offset stored at [at] points to. */
    private fun deref(at: Int): Int {
        val offset = u32(at)
        require(offset >= 0) { "$source is damaged: a negative offset. Copy or export it again." }
        return at + offset
    }

    /** Where field [id] of [table] is stored, or 0 if it is absent. */
    private fun field(table: Int, id: Int): Int {
        val vtable = table - u32(table)
        val slot = 4 + 2 * id
        if (slot + 2 > u16(vtable)) return 0
        val offset = u16(vtable + slot)
        return if (offset == 0) 0 else table + offset
    }

    /** (first element, count) of vector field [id] of [table], or null if absent. */
    private fun vector(table: Int, id: Int, elementSize: Int): Pair<Int, Int>? {
        val at = field(table, id)
        if (at == 0) return null
        val vector = deref(at)
        val count = u32(vector)
        require(count >= 0 && count <= (bytes.limit() - vector - 4) / elementSize) {
            "$source is damaged: a vector runs past the end of the file. Copy or export it again."
        }
        return vector + 4 to count
    }

    private companion object {
        // Field ids in schema.fbs: Model.buffers, Model.metadata, Metadata.name,
        // Metadata.buffer, Buffer.data.
        const val MODEL_BUFFERS = 4
        const val MODEL_METADATA = 6
        const val METADATA_NAME_FIELD = 0
        const val METADATA_BUFFER_FIELD = 1
        const val BUFFER_DATA = 0
    }
}
