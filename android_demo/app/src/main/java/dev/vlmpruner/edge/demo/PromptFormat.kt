package dev.vlmpruner.edge.demo

/**
 * The model's prompt around the image: [beforeImage] is prefilled as text, then the image, then [afterImage] is
 * given to `generate` (the ExecuTorch runner puts the image's tokens between the two, no placeholder token).
 */
class PromptParts(val beforeImage: String, val afterImage: String)

/**
 * `tokenizer.prompt_format` of export_config.json, a Python format string, as runtime/prompt.py renders it:
 * `format.format(prompt=question, image=<image token text>)`. The image sits at a `{image}` field or at the image
 * token's text written literally (the exporter writes LLaVA's "USER: <image>\n{prompt} ASSISTANT:"); `{{` and
 * `}}` are literal braces. Exactly one image and at least one `{prompt}` are required.
 */
object PromptFormat {
    const val PROMPT_FIELD = "prompt"
    const val IMAGE_FIELD = "image"

    fun split(format: String, question: String, imageToken: String?): PromptParts {
        if (question.isBlank()) throw IllegalArgumentException("Type a question about the image first.")
        val pieces = parse(format)
        if (pieces.none { it is Piece.Field && it.name == PROMPT_FIELD }) {
            throw ConfigException("prompt_format '$format' has no {$PROMPT_FIELD} field; re-export the model")
        }
        val marked = ArrayList<Piece>()
        for (piece in pieces) {
            if (piece is Piece.Literal && !imageToken.isNullOrEmpty()) marked.addAll(splitAtToken(piece.text, imageToken))
            else marked.add(piece)
        }
        val images = marked.count { it is Piece.Field && it.name == IMAGE_FIELD }
        if (images != 1) {
            throw ConfigException(
                "prompt_format '$format' places $images images (image token ${imageToken ?: "unknown"}); the app " +
                    "sends exactly one: re-export the model"
            )
        }
        val before = StringBuilder()
        val after = StringBuilder()
        var target = before
        for (piece in marked) {
            when (piece) {
                is Piece.Literal -> target.append(piece.text)
                is Piece.Field -> when (piece.name) {
                    IMAGE_FIELD -> target = after
                    PROMPT_FIELD -> target.append(question)
                    else -> throw ConfigException(
                        "prompt_format has a field {${piece.name}} the app cannot fill (only {$PROMPT_FIELD}, " +
                            "{$IMAGE_FIELD}); re-export the model"
                    )
                }
            }
        }
        return PromptParts(before.toString(), after.toString())
    }

    private sealed class Piece {
        class Literal(val text: String) : Piece()
        class Field(val name: String) : Piece()
    }

    private fun splitAtToken(text: String, token: String): List<Piece> {
        val out = ArrayList<Piece>()
        var start = 0
        while (true) {
            val at = text.indexOf(token, start)
            if (at < 0) break
            if (at > start) out.add(Piece.Literal(text.substring(start, at)))
            out.add(Piece.Field(IMAGE_FIELD))
            start = at + token.length
        }
        if (start < text.length) out.add(Piece.Literal(text.substring(start)))
        return out
    }

    /** Python's str.format grammar, restricted to plain named fields: `{name}`, `{{`, `}}`. */
    private fun parse(format: String): List<Piece> {
        val pieces = ArrayList<Piece>()
        val literal = StringBuilder()
        var i = 0
        while (i < format.length) {
            val c = format[i]
            when {
                c == '{' && i + 1 < format.length && format[i + 1] == '{' -> { literal.append('{'); i += 2 }
                c == '}' && i + 1 < format.length && format[i + 1] == '}' -> { literal.append('}'); i += 2 }
                c == '{' -> {
                    val end = format.indexOf('}', i)
                    if (end < 0) throw ConfigException("prompt_format '$format' has an unclosed '{'; re-export the model")
                    val name = format.substring(i + 1, end)
                    if (name.isEmpty() || name.any { !(it.isLetterOrDigit() || it == '_') }) {
                        throw ConfigException("prompt_format field {$name} is not a plain name; re-export the model")
                    }
                    if (literal.isNotEmpty()) pieces.add(Piece.Literal(literal.toString()))
                    literal.setLength(0)
                    pieces.add(Piece.Field(name))
                    i = end + 1
                }
                c == '}' -> throw ConfigException("prompt_format '$format' has a single '}'; re-export the model")
                else -> { literal.append(c); i++ }
            }
        }
        if (literal.isNotEmpty()) pieces.add(Piece.Literal(literal.toString()))
        return pieces
    }
}
