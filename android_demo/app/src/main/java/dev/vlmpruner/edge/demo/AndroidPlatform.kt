package dev.vlmpruner.edge.demo

import android.app.ActivityManager
import android.content.ContentResolver
import android.content.Context
import android.graphics.Bitmap
import android.graphics.ImageDecoder
import android.net.Uri
import android.os.Debug
import java.io.File
import java.io.IOException
import java.nio.ByteBuffer

/**
 * A decoded image's stored 8-bit values (no colour conversion, straight alpha), upright, as [ArgbSource].
 *
 * `Bitmap.getPixels` would convert wide-gamut pixels to sRGB; Pillow, and so the runtime, keeps the stored values,
 * so the raw buffer is read instead (ARGB_8888 lies in memory as R, G, B, A bytes).
 */
class BitmapSource(bitmap: Bitmap) : ArgbSource {
    override val width: Int = bitmap.width
    override val height: Int = bitmap.height
    private val rowBytes: Int
    private val buffer: ByteBuffer

    init {
        val pixels = if (bitmap.config == Bitmap.Config.ARGB_8888) bitmap else bitmap.copy(Bitmap.Config.ARGB_8888, false)
        rowBytes = pixels.rowBytes
        buffer = ByteBuffer.allocate(pixels.rowBytes * pixels.height)
        pixels.copyPixelsToBuffer(buffer)
        if (pixels !== bitmap) pixels.recycle()
    }

    override fun readRow(y: Int, out: IntArray) {
        var p = y * rowBytes
        for (x in 0 until width) {
            val r = buffer.get(p).toInt() and BYTE
            val g = buffer.get(p + 1).toInt() and BYTE
            val b = buffer.get(p + 2).toInt() and BYTE
            val a = buffer.get(p + 3).toInt() and BYTE
            out[x] = (a shl ALPHA) or (r shl RED) or (g shl GREEN) or b
            p += BYTES_PER_PIXEL
        }
    }

    private companion object {
        const val BYTE = 0xFF
        const val BYTES_PER_PIXEL = 4
        const val GREEN = 8
        const val RED = 2 * GREEN
        const val ALPHA = 3 * GREEN
    }
}

object AndroidImages {
    private const val PREVIEW_EDGE = 768

    /** Decodes a picked image (EXIF orientation applied, as the runtime's load_image does), unpremultiplied. */
    fun decode(resolver: ContentResolver, uri: Uri): Bitmap {
        val source = ImageDecoder.createSource(resolver, uri)
        return ImageDecoder.decodeBitmap(source) { decoder, _, _ ->
            decoder.allocator = ImageDecoder.ALLOCATOR_SOFTWARE // readable pixels
            decoder.isUnpremultipliedRequired = true // straight alpha, as Pillow stores RGBA
        }
    }

    /** A small copy for the screen; preprocessing always reads the full-size image. */
    fun preview(bitmap: Bitmap): Bitmap {
        val edge = Math.max(bitmap.width, bitmap.height)
        if (edge <= PREVIEW_EDGE) return bitmap
        val scale = PREVIEW_EDGE.toDouble() / edge
        return Bitmap.createScaledBitmap(bitmap, Math.max(1, (bitmap.width * scale).toInt()),
            Math.max(1, (bitmap.height * scale).toInt()), true)
    }
}

object DeviceMemory {
    /** This process: PSS (Debug.getMemoryInfo, KiB) and peak resident set (VmHWM of /proc/self/status). */
    fun snapshot(): MemorySnapshot {
        val info = Debug.MemoryInfo()
        Debug.getMemoryInfo(info)
        val peak = try {
            peakRssKb(File("/proc/self/status").readText())
        } catch (error: IOException) {
            null
        }
        return MemorySnapshot(info.totalPss.toLong(), peak)
    }

    /** The phone's RAM: total and available now, in bytes. */
    fun device(context: Context): LongArray {
        val manager = context.getSystemService(Context.ACTIVITY_SERVICE) as ActivityManager
        val info = ActivityManager.MemoryInfo()
        manager.getMemoryInfo(info)
        return longArrayOf(info.totalMem, info.availMem)
    }
}
