package dev.vlmpruner.edge.demo

import org.json.JSONArray
import org.json.JSONObject
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Test

class ImagePreprocessorTest {
    /**
     * preprocess_golden.json: small images and specs with runtime/preprocess.py's output, written by
     * `python tests/test_android_demo.py --write-fixtures` (the Python test fails when it is out of date).
     */
    @Test
    fun matchesTheRuntimeBitForBit() {
        val cases = JSONObject(TestResources.text("preprocess_golden.json")).getJSONArray("cases")
        assertTrue(cases.length() > 0)
        for (i in 0 until cases.length()) {
            val case = cases.getJSONObject(i)
            val name = case.getString("name")
            val spec = ImagePreprocessing.fromJson(case.getJSONObject("image_preprocessing"))
            val argb = intList(case.getJSONArray("argb")).toIntArray()
            val source = ArgbArray(case.getInt("width"), case.getInt("height"), argb)
            val maxPixels = case.optLong("max_pixels", ImagePreprocessor.MAX_INTERMEDIATE_PIXELS)
            val out = ImagePreprocessor(spec, maxPixels).run(source)
            assertEquals(name, case.getInt("out_width"), out.width)
            assertEquals(name, case.getInt("out_height"), out.height)
            val expected = case.getJSONArray("expected")
            when (out) {
                is EncoderInput.Normalized -> assertArrayEquals(name, floats(expected), out.values, 0f)
                is EncoderInput.Pixels -> assertArrayEquals(name, intList(expected).toIntArray(), out.values)
            }
        }
    }

    @Test
    fun compositesTransparencyOntoWhiteLikePillow() {
        for (v in 0..255) assertEquals(v, OpaqueRows.overWhite(v, 255))
        assertEquals(255, OpaqueRows.overWhite(0, 0))
        assertEquals(128, OpaqueRows.overWhite(0, 127)) // Pillow: alpha_composite(white, (0, 0, 0, 127))
    }

    @Test
    fun centerCropPadsWithZerosWhereTheImageIsSmaller() {
        val image = RgbImage(2, 1, byteArrayOf(1, 2, 3, 4, 5, 6))
        val crop = ImagePreprocessor.centerCrop(image, 2, 3)
        // the window starts at floor((1 - 2) / 2) = -1 rows, floor((2 - 3) / 2) = -1 columns
        assertArrayEquals(byteArrayOf(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6), crop.data)
    }

    @Test
    fun filterWeightsSumToOneInFixedPoint() {
        for (filter in ResampleFilter.values()) {
            if (filter == ResampleFilter.NEAREST) continue
            val k = Resampler.Coefficients.of(100, 37, filter)
            for (xx in 0 until 37) {
                var sum = 0
                for (x in 0 until k.bounds[xx * 2 + 1]) sum += k.weights[xx * k.size + x]
                assertTrue("$filter $xx: $sum", Math.abs(sum - (1 shl 22)) <= k.size)
            }
        }
    }

    private fun floats(array: JSONArray) = FloatArray(array.length()) { array.getDouble(it).toFloat() }
}
