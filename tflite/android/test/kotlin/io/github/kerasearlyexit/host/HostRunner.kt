// Host test driver for EarlyExitClassifier and FusedEarlyExitClassifier
// (tests/test_android_kotlin.py).
//
// Serves the bundles and fused files under the directory args[0] as assets,
// through the host stand-ins in tflite/android/test/java. Reads one command
// per line on stdin and prints one JSON object per command, with the
// stand-ins' counts of interpreters and asset handles still open:
//   open BUNDLE [NUM_THREADS]     open_fused FILE [NUM_THREADS]
//   classify [[x, ...], ...]      classify_named {"name": [x, ...]}
//   classify_values [[...], ...]  classify_named_values {"name": [...]}
//     (_values: an array of JSON integers is an IntArray, others FloatArrays)
//   thresholds [t, ...]           quantize_threshold [[t, scale, zero_point], ...]
//   patience P
//   counts                        close
// classify, counts and close act on the classifier opened last.
package io.github.kerasearlyexit.host

import android.content.Context
import android.content.res.AssetManager
import io.github.kerasearlyexit.EarlyExitClassifier
import io.github.kerasearlyexit.EarlyExitResult
import io.github.kerasearlyexit.FusedEarlyExitClassifier
import org.json.JSONArray
import org.json.JSONObject
import org.tensorflow.lite.Interpreter
import java.io.File

private fun floats(a: JSONArray) = FloatArray(a.length()) { a.getDouble(it).toFloat() }

/** IntArray if every element is a JSON integer (e.g. 3, not 3.0), else FloatArray. */
private fun values(a: JSONArray): Any =
    if ((0 until a.length()).all { a.get(it) is Int }) IntArray(a.length()) { a.getInt(it) } else floats(a)

private fun JSONObject.putResult(r: EarlyExitResult) {
    put("label", r.label)
    put("exit", r.exitIndex)
    put("confidence", r.confidence.toDouble())
}

fun main(args: Array<String>) {
    val assets = AssetManager(File(args[0]))
    val context = object : Context() {
        override fun getAssets() = assets
    }
    var classifier: EarlyExitClassifier? = null
    var fused: FusedEarlyExitClassifier? = null
    for (line in generateSequence(::readLine)) {
        val command = line.substringBefore(' ')
        val argument = line.substringAfter(' ', "")
        val reply = JSONObject()
        try {
            when (command) {
                "open" -> {
                    val parts = argument.split(' ')
                    val threads = if (parts.size > 1) parts[1].toInt() else 1
                    val opened = EarlyExitClassifier(context, parts[0], threads)
                    classifier = opened
                    fused = null
                    reply.put("exit_names", JSONArray(opened.exitNames))
                    reply.put("input_names", JSONArray(opened.inputNames))
                    reply.put("thresholds", JSONArray(opened.thresholds.map { it.toDouble() }))
                    reply.put("patience", opened.patience)
                }
                "open_fused" -> {
                    val parts = argument.split(' ')
                    val threads = if (parts.size > 1) parts[1].toInt() else 1
                    val opened = FusedEarlyExitClassifier(context, parts[0], threads)
                    fused = opened
                    classifier = null
                    reply.put("exit_names", JSONArray(opened.exitNames))
                    reply.put("input_names", JSONArray(opened.inputNames))
                    reply.put("quantization", opened.quantization)
                    reply.put("num_classes", opened.numClasses)
                    reply.put("thresholds", JSONArray(opened.thresholds.map { it.toDouble() }))
                    reply.put("thresholds_quantized", opened.thresholdsQuantized?.let { JSONArray(it.toList()) } ?: JSONObject.NULL)
                    reply.put("logits", opened.logits != null)
                    reply.put("patience", opened.patience)
                }
                "classify" -> {
                    val a = JSONArray(argument)
                    val inputs = Array(a.length()) { floats(a.getJSONArray(it)) }
                    val open = fused
                    if (open != null) {
                        reply.putResult(open.classify(*inputs))
                        open.logits?.let { reply.put("logits", JSONArray(it.map(Float::toDouble))) }
                    } else {
                        reply.putResult(classifier!!.classify(*inputs))
                    }
                }
                "classify_named" -> {
                    val o = JSONObject(argument)
                    val inputs = o.keys().asSequence().associateWith { floats(o.getJSONArray(it)) }
                    reply.putResult(fused?.classify(inputs) ?: classifier!!.classify(inputs))
                }
                "classify_values" -> {
                    val a = JSONArray(argument)
                    val inputs = Array(a.length()) { values(a.getJSONArray(it)) }
                    reply.putResult(fused?.classify(*inputs) ?: classifier!!.classify(*inputs))
                }
                "classify_named_values" -> {
                    val o = JSONObject(argument)
                    val inputs = o.keys().asSequence().associateWith { values(o.getJSONArray(it)) }
                    reply.putResult(fused?.classify(inputs) ?: classifier!!.classify(inputs))
                }
                "thresholds" -> {
                    classifier!!.setThresholds(floats(JSONArray(argument)))
                    reply.put("thresholds", JSONArray(classifier.thresholds.map { it.toDouble() }))
                }
                "patience" -> {
                    classifier!!.setPatience(argument.toInt())
                    reply.put("patience", classifier.patience)
                }
                "quantize_threshold" -> {
                    val a = JSONArray(argument)
                    reply.put("q", JSONArray(List(a.length()) {
                        val (t, s, z) = a.getJSONArray(it).let { v -> Triple(v.getDouble(0), v.getDouble(1), v.getInt(2)) }
                        EarlyExitClassifier.quantizeThreshold(t.toFloat(), s.toFloat(), z)
                    }))
                }
                "counts" -> reply.put("exit_counts", JSONArray((fused?.exitCounts ?: classifier!!.exitCounts).toList()))
                "close" -> {
                    fused?.close()
                    classifier?.close()
                }
                else -> throw IllegalArgumentException("Unknown command '$command'")
            }
        } catch (e: Exception) {
            reply.put("error", e.javaClass.name)
            reply.put("message", e.message)
        }
        reply.put("live_interpreters", Interpreter.liveInstances())
        reply.put("open_assets", assets.openHandles())
        println(reply)
    }
}
