package dev.vlmpruner.edge.demo

/**
 * The vision encoder's input for one image, computed exactly as runtime/preprocess.py computes it (Pillow's
 * integer resampling, numpy's float32 arithmetic), from the `image_preprocessing` of the model's export_config.json.
 *
 * Steps, in the runtime's order:
 * 1. RGB: a pixel with alpha < 255 is composited onto white with Pillow's integer `alpha_composite`;
 * 2. pad to a square of the longest edge, image centred (offset floored), `pad_color` around (LLaVA's do_pad);
 * 3. resize: `shortest_edge` (short side -> n, long side -> int(n * long / short)) or height x width, with Pillow's
 *    filter (`resample`): two separable passes of 22-bit fixed-point weights, horizontal first;
 * 4. centre crop, zero outside the image (window starts at floor((H - h) / 2));
 * 5. `uint8_chw`: the 0-255 pixels as [3, H, W]; `float_nchw`: x * rescale_factor in double, rounded to float, then
 *    (x - mean) / std in float, as [1, 3, H, W] (LlmModule takes the CHW planes, the runner adds the batch dim).
 *
 * Decoding the file is the platform's (Android's JPEG decoder may differ from libjpeg by a grey level on some
 * pixels); from the decoded pixels on, the result is the runtime's bit for bit.
 *
 * Extreme aspect ratios (runtime/preprocess.py bounded_source, the same rule): where the resized image, or the
 * padded square, would hold more than [maxPixels] pixels, the image is first reduced in source pixels: centre-cropped
 * along its long side to ceil(2 * crop * short / shortest_edge) pixels plus the filter's reach on both sides, exactly
 * centred (resize + crop), or resized to a longest edge of isqrt(maxPixels) (pad to square); a shortest-edge resize
 * without a crop is refused. A 1 x 20000 px photo then costs kilobytes, not the gigabytes of its resized
 * intermediate.
 */
class ImagePreprocessor(
    private val spec: ImagePreprocessing,
    private val maxPixels: Long = MAX_INTERMEDIATE_PIXELS
) {

    /** (height, width) of the encoder input for an image of this size. */
    fun outputSize(height: Int, width: Int): IntArray = spec.outputSize(height, width)

    fun run(source: ArgbSource): EncoderInput {
        require(source.width > 0 && source.height > 0) { "empty image (${source.width}x${source.height})" }
        var image: RowSource = boundedSource(OpaqueRows(source))
        if (spec.doPadToSquare) image = SquarePadding(image, spec.padColor)
        val resized = if (spec.doResize) {
            val size = spec.resizedSize(image.height, image.width)
            Resampler.resize(image, size[1], size[0], spec.resample)
        } else {
            RgbImage.copyOf(image)
        }
        val cropped = if (spec.doCenterCrop) centerCrop(resized, spec.cropHeight!!, spec.cropWidth!!) else resized
        return when (spec.inputLayout) {
            InputLayout.UINT8_CHW -> EncoderInput.Pixels(cropped.width, cropped.height, planesUint8(cropped))
            InputLayout.FLOAT_NCHW -> EncoderInput.Normalized(cropped.width, cropped.height, planesFloat(cropped))
        }
    }

    /** runtime/preprocess.py bounded_source: [image], reduced where the later steps would exceed [maxPixels]. */
    internal fun boundedSource(image: RowSource): RowSource {
        val width = image.width.toLong()
        val height = image.height.toLong()
        if (spec.doPadToSquare) {
            val side = Math.max(width, height)
            if (side * side <= maxPixels) return image
            val longest = isqrt(maxPixels)
            val size = if (width >= height) {
                longArrayOf(longest, Math.max(1L, height * longest / width))
            } else {
                longArrayOf(Math.max(1L, width * longest / height), longest)
            }
            return RgbRows(Resampler.resize(image, size[0].toInt(), size[1].toInt(), spec.resample))
        }
        val edge = spec.shortestEdge
        if (!spec.doResize || edge == null) return image
        val short = Math.min(width, height)
        val long = Math.max(width, height)
        val resizedLong = (edge.toLong() * long).toDouble() / short // Python: int(n * long / short)
        if (Math.floor(resizedLong) * edge <= maxPixels.toDouble()) return image
        require(spec.doCenterCrop) {
            "a ${image.width} x ${image.height} px image resized to a shortest edge of $edge px would be larger than " +
                "$maxPixels px; crop it to a less extreme aspect ratio first"
        }
        val crop = (if (width <= height) spec.cropHeight!! else spec.cropWidth!!).toLong()
        val n = edge.toLong()
        val halves = Resampler.supportHalfPixels(spec.resample).toLong()
        val reach = Math.floorDiv(halves * Math.max(short, n) + 2 * n - 1, 2 * n) + 1 // source px per side
        var keep = Math.min(long, Math.floorDiv(2 * crop * short + n - 1, n) + 2 * reach)
        keep += (long - keep) % 2 // centred exactly
        val start = (long - keep) / 2
        return if (width <= height) {
            CroppedRows(image, 0, start.toInt(), image.width, keep.toInt())
        } else {
            CroppedRows(image, start.toInt(), 0, keep.toInt(), image.height)
        }
    }

    private fun planesUint8(image: RgbImage): IntArray {
        val plane = image.width * image.height
        val out = IntArray(CHANNELS * plane)
        for (i in 0 until plane) {
            for (c in 0 until CHANNELS) out[c * plane + i] = image.data[i * CHANNELS + c].toInt() and BYTE_MASK
        }
        return out
    }

    private fun planesFloat(image: RgbImage): FloatArray {
        val plane = image.width * image.height
        val mean = FloatArray(CHANNELS) { spec.imageMean[it].toFloat() }
        val std = FloatArray(CHANNELS) { spec.imageStd[it].toFloat() }
        // One table per channel: 256 possible inputs, each computed with the runtime's exact float ops.
        val table = Array(CHANNELS) { c ->
            FloatArray(BYTE_VALUES) { p ->
                var v = if (spec.doRescale) (p.toDouble() * spec.rescaleFactor).toFloat() else p.toFloat()
                if (spec.doNormalize) v = (v - mean[c]) / std[c]
                v
            }
        }
        val out = FloatArray(CHANNELS * plane)
        for (i in 0 until plane) {
            for (c in 0 until CHANNELS) out[c * plane + i] = table[c][image.data[i * CHANNELS + c].toInt() and BYTE_MASK]
        }
        return out
    }

    companion object {
        const val CHANNELS = ImagePreprocessing.CHANNELS
        internal const val BYTE_MASK = 0xFF
        private const val BYTE_VALUES = 256

        /** runtime/preprocess.py MAX_INTERMEDIATE_PIXELS: the largest resized or padded image built (2^26 px). */
        const val MAX_INTERMEDIATE_PIXELS = 1L shl 26

        /** floor(sqrt(n)), exactly (Python's math.isqrt). */
        fun isqrt(n: Long): Long {
            var root = Math.sqrt(n.toDouble()).toLong()
            while (root * root > n) root--
            while ((root + 1) * (root + 1) <= n) root++
            return root
        }

        /** runtime/preprocess.py center_crop: the window at floor((H - h) / 2), zero where it leaves the image. */
        fun centerCrop(image: RgbImage, cropHeight: Int, cropWidth: Int): RgbImage {
            val top = Math.floorDiv(image.height - cropHeight, 2)
            val left = Math.floorDiv(image.width - cropWidth, 2)
            val out = ByteArray(cropHeight * cropWidth * CHANNELS)
            for (i in 0 until cropHeight) {
                val y = top + i
                if (y < 0 || y >= image.height) continue
                for (j in 0 until cropWidth) {
                    val x = left + j
                    if (x < 0 || x >= image.width) continue
                    System.arraycopy(image.data, (y * image.width + x) * CHANNELS, out, (i * cropWidth + j) * CHANNELS, CHANNELS)
                }
            }
            return RgbImage(cropWidth, cropHeight, out)
        }
    }
}

/** Rows of straight (not premultiplied) ARGB ints: what Android's Bitmap pixels and java.awt images are. */
interface ArgbSource {
    val width: Int
    val height: Int

    /** Row [y] into out[0 until width]. */
    fun readRow(y: Int, out: IntArray)
}

class ArgbArray(override val width: Int, override val height: Int, private val pixels: IntArray) : ArgbSource {
    init {
        require(pixels.size == width * height) { "expected ${width * height} pixels, got ${pixels.size}" }
    }

    override fun readRow(y: Int, out: IntArray) = System.arraycopy(pixels, y * width, out, 0, width)
}

/** What `LlmModule.prefillImages` takes: CHW planes of [width] x [height] with 3 channels. */
sealed class EncoderInput(val width: Int, val height: Int) {
    val channels: Int get() = ImagePreprocessing.CHANNELS

    /** float_nchw: normalised values. */
    class Normalized(width: Int, height: Int, val values: FloatArray) : EncoderInput(width, height)

    /** uint8_chw: 0-255 pixel values (LlmModule's IntArray overload). */
    class Pixels(width: Int, height: Int, val values: IntArray) : EncoderInput(width, height)
}

/** An RGB image, 3 bytes per pixel, rows top to bottom. */
class RgbImage(val width: Int, val height: Int, val data: ByteArray) {
    companion object {
        fun copyOf(rows: RowSource): RgbImage {
            val stride = rows.width * ImagePreprocessor.CHANNELS
            val data = ByteArray(stride * rows.height)
            val row = ByteArray(stride)
            for (y in 0 until rows.height) {
                rows.readRow(y, row)
                System.arraycopy(row, 0, data, y * stride, stride)
            }
            return RgbImage(rows.width, rows.height, data)
        }
    }
}

/** A window of [image]: [width] x [height] pixels from column [left], row [top] (Pillow's Image.crop inside it). */
class CroppedRows(
    private val image: RowSource,
    private val left: Int,
    private val top: Int,
    override val width: Int,
    override val height: Int
) : RowSource {
    private val row = ByteArray(image.width * ImagePreprocessor.CHANNELS)

    override fun readRow(y: Int, out: ByteArray) {
        image.readRow(y + top, row)
        System.arraycopy(row, left * ImagePreprocessor.CHANNELS, out, 0, width * ImagePreprocessor.CHANNELS)
    }
}

/** An RgbImage read back as rows. */
class RgbRows(private val image: RgbImage) : RowSource {
    override val width: Int get() = image.width
    override val height: Int get() = image.height

    override fun readRow(y: Int, out: ByteArray) {
        val stride = image.width * ImagePreprocessor.CHANNELS
        System.arraycopy(image.data, y * stride, out, 0, stride)
    }
}

/** Rows of RGB bytes, produced on demand (a 12 MP photo is never held as floats). */
interface RowSource {
    val width: Int
    val height: Int

    /** Row [y] into out[0 until 3 * width]. */
    fun readRow(y: Int, out: ByteArray)
}

/** Pillow's `alpha_composite` of the image over opaque white (transformers' convert_to_rgb); identity at alpha 255. */
class OpaqueRows(private val source: ArgbSource) : RowSource {
    override val width: Int get() = source.width
    override val height: Int get() = source.height
    private val argb = IntArray(source.width)

    override fun readRow(y: Int, out: ByteArray) {
        source.readRow(y, argb)
        for (x in 0 until width) {
            val pixel = argb[x]
            val alpha = (pixel ushr ALPHA_SHIFT) and ImagePreprocessor.BYTE_MASK
            for (c in 0 until ImagePreprocessor.CHANNELS) {
                val value = (pixel ushr CHANNEL_SHIFTS[c]) and ImagePreprocessor.BYTE_MASK
                out[x * ImagePreprocessor.CHANNELS + c] = overWhite(value, alpha).toByte()
            }
        }
    }

    companion object {
        private const val BITS = 8
        private const val ALPHA_SHIFT = 3 * BITS // ARGB: alpha in the top byte, then red, green, blue
        private val CHANNEL_SHIFTS = intArrayOf(2 * BITS, BITS, 0)
        private const val OPAQUE = 255
        private const val COMPOSITE_BITS = 7 // Pillow AlphaComposite.c PRECISION_BITS

        /** One channel of Pillow's ImagingAlphaComposite(dst = white, src = (value, alpha)). */
        fun overWhite(value: Int, alpha: Int): Int {
            if (alpha == OPAQUE) return value
            if (alpha == 0) return OPAQUE
            val blend = OPAQUE * (OPAQUE - alpha)
            val outA255 = alpha * OPAQUE + blend
            val coef1 = alpha * OPAQUE * OPAQUE * (1 shl COMPOSITE_BITS) / outA255
            val coef2 = OPAQUE * (1 shl COMPOSITE_BITS) - coef1
            val tmp = value * coef1 + OPAQUE * coef2 + (0x80 shl COMPOSITE_BITS)
            return (((tmp ushr BITS) + tmp) ushr BITS) ushr COMPOSITE_BITS
        }
    }
}

/** runtime/preprocess.py pad_to_square: the image centred on a square of its longest edge filled with [color]. */
class SquarePadding(private val image: RowSource, private val color: IntArray) : RowSource {
    private val side = Math.max(image.width, image.height)
    private val left = (side - image.width) / 2
    private val top = (side - image.height) / 2
    private val inner = ByteArray(image.width * ImagePreprocessor.CHANNELS)
    override val width: Int get() = side
    override val height: Int get() = side

    override fun readRow(y: Int, out: ByteArray) {
        for (x in 0 until side) {
            for (c in 0 until ImagePreprocessor.CHANNELS) out[x * ImagePreprocessor.CHANNELS + c] = color[c].toByte()
        }
        val row = y - top
        if (row < 0 || row >= image.height) return
        image.readRow(row, inner)
        System.arraycopy(inner, 0, out, left * ImagePreprocessor.CHANNELS, inner.size)
    }
}

/**
 * Pillow's `Image.resize` for RGB images (libImaging/Resample.c and, for NEAREST, Geometry.c's affine scale),
 * reducing_gap=None, box = the whole image.
 */
object Resampler {
    private const val PRECISION_BITS = 32 - 8 - 2
    private const val ONE = (1 shl PRECISION_BITS).toDouble()
    private const val HALF = 1 shl (PRECISION_BITS - 1)
    private const val CHANNELS = ImagePreprocessor.CHANNELS

    /** The filter's support (reach) in half input pixels at scale 1 (runtime/preprocess.py FILTER_SUPPORT_HALVES). */
    fun supportHalfPixels(filter: ResampleFilter): Int = (Coefficients.support(filter) * 2).toInt()

    fun resize(image: RowSource, outWidth: Int, outHeight: Int, filter: ResampleFilter): RgbImage {
        require(outWidth > 0 && outHeight > 0) { "resize to ${outWidth}x$outHeight" }
        if (outWidth == image.width && outHeight == image.height) return RgbImage.copyOf(image)
        if (filter == ResampleFilter.NEAREST) return nearest(image, outWidth, outHeight)
        val horizontal = Coefficients.of(image.width, outWidth, filter)
        val vertical = Coefficients.of(image.height, outHeight, filter)
        // Rows the vertical pass reads: the first row of the first window to the last row of the last one.
        val firstRow = vertical.bounds[0]
        val lastRow = vertical.bounds[outHeight * 2 - 2] + vertical.bounds[outHeight * 2 - 1]
        var current = if (outWidth != image.width) {
            horizontalPass(image, firstRow, lastRow, horizontal)
        } else {
            RgbImage.copyOf(RowWindow(image, firstRow, lastRow))
        }
        if (outHeight != image.height) current = verticalPass(current, firstRow, vertical, outHeight)
        return current
    }

    private fun horizontalPass(image: RowSource, firstRow: Int, lastRow: Int, k: Coefficients): RgbImage {
        val outWidth = k.outSize
        val rows = lastRow - firstRow
        val out = ByteArray(outWidth * rows * CHANNELS)
        val row = ByteArray(image.width * CHANNELS)
        for (yy in 0 until rows) {
            image.readRow(yy + firstRow, row)
            for (xx in 0 until outWidth) {
                val xmin = k.bounds[xx * 2]
                val xmax = k.bounds[xx * 2 + 1]
                val base = xx * k.size
                var s0 = HALF
                var s1 = HALF
                var s2 = HALF
                for (x in 0 until xmax) {
                    val weight = k.weights[base + x]
                    val p = (x + xmin) * CHANNELS
                    s0 += (row[p].toInt() and ImagePreprocessor.BYTE_MASK) * weight
                    s1 += (row[p + 1].toInt() and ImagePreprocessor.BYTE_MASK) * weight
                    s2 += (row[p + 2].toInt() and ImagePreprocessor.BYTE_MASK) * weight
                }
                val o = (yy * outWidth + xx) * CHANNELS
                out[o] = clip8(s0)
                out[o + 1] = clip8(s1)
                out[o + 2] = clip8(s2)
            }
        }
        return RgbImage(outWidth, rows, out)
    }

    /** [image] holds source rows firstRow until firstRow + image.height. */
    private fun verticalPass(image: RgbImage, firstRow: Int, k: Coefficients, outHeight: Int): RgbImage {
        val width = image.width
        val out = ByteArray(width * outHeight * CHANNELS)
        for (yy in 0 until outHeight) {
            val ymin = k.bounds[yy * 2] - firstRow
            val ymax = k.bounds[yy * 2 + 1]
            val base = yy * k.size
            for (xx in 0 until width) {
                var s0 = HALF
                var s1 = HALF
                var s2 = HALF
                for (y in 0 until ymax) {
                    val weight = k.weights[base + y]
                    val p = ((y + ymin) * width + xx) * CHANNELS
                    s0 += (image.data[p].toInt() and ImagePreprocessor.BYTE_MASK) * weight
                    s1 += (image.data[p + 1].toInt() and ImagePreprocessor.BYTE_MASK) * weight
                    s2 += (image.data[p + 2].toInt() and ImagePreprocessor.BYTE_MASK) * weight
                }
                val o = (yy * width + xx) * CHANNELS
                out[o] = clip8(s0)
                out[o + 1] = clip8(s1)
                out[o + 2] = clip8(s2)
            }
        }
        return RgbImage(width, outHeight, out)
    }

    /** Pillow's clip8: the fixed-point sum's integer part, clamped to 0..255. */
    private fun clip8(sum: Int): Byte {
        val value = sum shr PRECISION_BITS
        return (if (value < 0) 0 else if (value > ImagePreprocessor.BYTE_MASK) ImagePreprocessor.BYTE_MASK else value).toByte()
    }

    /** Geometry.c ImagingScaleAffine: source coordinates accumulated in double, truncated. */
    private fun nearest(image: RowSource, outWidth: Int, outHeight: Int): RgbImage {
        val scaleX = image.width.toDouble() / outWidth
        val scaleY = image.height.toDouble() / outHeight
        val columns = IntArray(outWidth)
        var xo = scaleX * 0.5
        for (x in 0 until outWidth) {
            columns[x] = Math.min(coordinate(xo), image.width - 1)
            xo += scaleX
        }
        val out = ByteArray(outWidth * outHeight * CHANNELS)
        val row = ByteArray(image.width * CHANNELS)
        var cached = -1
        var yo = scaleY * 0.5
        for (y in 0 until outHeight) {
            val source = Math.min(coordinate(yo), image.height - 1)
            if (source != cached) {
                image.readRow(source, row)
                cached = source
            }
            for (x in 0 until outWidth) System.arraycopy(row, columns[x] * CHANNELS, out, (y * outWidth + x) * CHANNELS, CHANNELS)
            yo += scaleY
        }
        return RgbImage(outWidth, outHeight, out)
    }

    private fun coordinate(v: Double): Int = if (v < 0.0) 0 else v.toInt()

    /** Resample.c precompute_coeffs + normalize_coeffs_8bpc for one axis. */
    class Coefficients(val outSize: Int, val size: Int, val bounds: IntArray, val weights: IntArray) {
        companion object {
            fun of(inSize: Int, outSize: Int, filter: ResampleFilter): Coefficients {
                val scale = inSize.toDouble() / outSize
                val filterScale = if (scale < 1.0) 1.0 else scale
                val support = support(filter) * filterScale
                val size = Math.ceil(support).toInt() * 2 + 1
                val kk = DoubleArray(outSize * size)
                val bounds = IntArray(outSize * 2)
                val ss = 1.0 / filterScale
                for (xx in 0 until outSize) {
                    val center = (xx + 0.5) * scale
                    var xmin = (center - support + 0.5).toInt()
                    if (xmin < 0) xmin = 0
                    var xmax = (center + support + 0.5).toInt()
                    if (xmax > inSize) xmax = inSize
                    xmax -= xmin
                    val base = xx * size
                    var total = 0.0
                    for (x in 0 until xmax) {
                        val w = weight(filter, (x + xmin - center + 0.5) * ss)
                        kk[base + x] = w
                        total += w
                    }
                    if (total != 0.0) for (x in 0 until xmax) kk[base + x] /= total
                    bounds[xx * 2] = xmin
                    bounds[xx * 2 + 1] = xmax
                }
                val weights = IntArray(kk.size) { i ->
                    val v = kk[i]
                    if (v < 0) (-0.5 + v * ONE).toInt() else (0.5 + v * ONE).toInt()
                }
                return Coefficients(outSize, size, bounds, weights)
            }

            internal fun support(filter: ResampleFilter): Double = when (filter) {
                ResampleFilter.BOX -> 0.5
                ResampleFilter.BILINEAR, ResampleFilter.HAMMING -> 1.0
                ResampleFilter.BICUBIC -> 2.0
                ResampleFilter.LANCZOS -> 3.0
                ResampleFilter.NEAREST -> 0.0
            }

            /** The filters of Resample.c, term for term (float literals where Pillow has them). */
            fun weight(filter: ResampleFilter, x: Double): Double = when (filter) {
                ResampleFilter.BOX -> if (x > -0.5 && x <= 0.5) 1.0 else 0.0
                ResampleFilter.BILINEAR -> {
                    val a = Math.abs(x)
                    if (a < 1.0) 1.0 - a else 0.0
                }
                ResampleFilter.HAMMING -> {
                    val a = Math.abs(x)
                    when {
                        a == 0.0 -> 1.0
                        a >= 1.0 -> 0.0
                        else -> {
                            val t = a * Math.PI
                            Math.sin(t) / t * (HAMMING_A.toDouble() + HAMMING_B.toDouble() * Math.cos(t))
                        }
                    }
                }
                ResampleFilter.BICUBIC -> {
                    val a = Math.abs(x)
                    when {
                        a < 1.0 -> ((BICUBIC_A + 2.0) * a - (BICUBIC_A + 3.0)) * a * a + 1
                        a < 2.0 -> (((a - 5) * a + 8) * a - 4) * BICUBIC_A
                        else -> 0.0
                    }
                }
                ResampleFilter.LANCZOS -> if (-LANCZOS_LOBES <= x && x < LANCZOS_LOBES) sinc(x) * sinc(x / LANCZOS_LOBES) else 0.0
                ResampleFilter.NEAREST -> 0.0
            }

            private fun sinc(x: Double): Double {
                if (x == 0.0) return 1.0
                val t = x * Math.PI
                return Math.sin(t) / t
            }

            private const val BICUBIC_A = -0.5
            private const val LANCZOS_LOBES = 3.0
            private const val HAMMING_A = 0.54f
            private const val HAMMING_B = 0.46f
        }
    }

    /** Rows first until last of [image], as a RowSource. */
    private class RowWindow(private val image: RowSource, private val first: Int, last: Int) : RowSource {
        override val width: Int = image.width
        override val height: Int = last - first
        override fun readRow(y: Int, out: ByteArray) = image.readRow(y + first, out)
    }
}
