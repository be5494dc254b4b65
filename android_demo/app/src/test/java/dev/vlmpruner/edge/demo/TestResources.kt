package dev.vlmpruner.edge.demo

import org.json.JSONObject

/** Files under app/src/test/resources (tests/test_android_demo.py keeps them in step with the exporter). */
object TestResources {
    fun text(name: String): String {
        val stream = TestResources::class.java.classLoader!!.getResourceAsStream(name)
            ?: throw IllegalStateException("test resource $name is missing")
        return stream.bufferedReader().use { it.readText() }
    }

    /** The layer-0 export_config.json of a tiny-llava export, edited by [change]. */
    fun config(change: (JSONObject) -> Unit = {}): String {
        val json = JSONObject(text("export_config_layer0.json"))
        change(json)
        return json.toString()
    }
}
