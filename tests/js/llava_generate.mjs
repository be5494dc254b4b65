// Runs a layer-0 ONNX export of this project in transformers.js, as its users would: the folder loaded unchanged with
// LlavaForConditionalGeneration / AutoProcessor (local files only), greedy decoding with `generate`.
// Usage: node llava_generate.mjs request.json   (tests/test_transformers_js.py writes the request; one JSON line out)
// request: {folder, max_new_tokens, input_ids: [int], pixel_values: file of float32 [1, 3, H, W] (little-endian),
//           pixel_shape, question, images: [{path: an image file, pixels_out: where the processor's pixel_values go}]}
import { readFileSync, writeFileSync } from 'node:fs';
import * as ortWeb from 'onnxruntime-web';
import {
    AutoProcessor, LlavaForConditionalGeneration, LogitsProcessor, RawImage, Tensor, env,
} from '@huggingface/transformers';

env.allowRemoteModels = false;

/** Keeps the logits of the first step (the prefill's last position) and changes nothing. */
class FirstLogits extends LogitsProcessor {
    _call(input_ids, logits) {
        this.logits ??= Array.from(logits.data);
        return logits;
    }
}

async function greedy(model, inputs, max_new_tokens) {
    const first = new FirstLogits();
    const sequences = await model.generate({ ...inputs, max_new_tokens, do_sample: false, logits_processor: [first] });
    const prompt = inputs.input_ids.dims.at(-1);
    return { tokens: sequences.tolist()[0].slice(prompt).map(Number), first_logits: first.logits };
}

const request = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const options = { local_files_only: true };
const model = await LlavaForConditionalGeneration.from_pretrained(request.folder, { ...options, dtype: 'fp32' });

// 1. The project's runtime inputs, fed as they are.
const ids = request.input_ids.map(BigInt);
const buffer = readFileSync(request.pixel_values);
const pixels = new Float32Array(buffer.buffer, buffer.byteOffset, buffer.byteLength / 4);
const from_ids = await greedy(model, {
    input_ids: new Tensor('int64', BigInt64Array.from(ids), [1, ids.length]),
    attention_mask: new Tensor('int64', new BigInt64Array(ids.length).fill(1n), [1, ids.length]),
    pixel_values: new Tensor('float32', pixels, request.pixel_shape),
}, request.max_new_tokens);

// 2. Photographs through transformers.js' own processor and chat template.
const processor = await AutoProcessor.from_pretrained(request.folder, options);
const messages = [{ role: 'user', content: [{ type: 'image' }, { type: 'text', text: request.question }] }];
const prompt = processor.apply_chat_template(messages, { add_generation_prompt: true });
const from_images = [];
for (const image of request.images) {
    const inputs = await processor(await RawImage.read(image.path), prompt);
    writeFileSync(image.pixels_out, Buffer.from(inputs.pixel_values.data.buffer));
    from_images.push({
        ...(await greedy(model, inputs, request.max_new_tokens)),
        input_ids: inputs.input_ids.tolist()[0].map(Number),
        pixel_shape: inputs.pixel_values.dims,
    });
}

// 3. What a browser runs the graphs in: onnxruntime-web's WebAssembly backend (transformers.js' own dependency).
const folder_config = JSON.parse(readFileSync(`${request.folder}/export_config.json`, 'utf8'));
const encoder_file = readFileSync(`${request.folder}/${folder_config.graphs.vision_encoder}`);
const wasm = await ortWeb.InferenceSession.create(encoder_file, { executionProviders: ['wasm'] });
const encoded = await wasm.run({ pixel_values: new ortWeb.Tensor('float32', pixels, request.pixel_shape) });
const wasm_vision = { kept_image_indices: Array.from(encoded.kept_image_indices.data, Number),
                      image_features: Array.from(encoded.image_features.data) };

console.log(JSON.stringify({ version: env.version, processor: processor.constructor.name, prompt, from_ids, from_images,
                             wasm_vision }));
