// The official openai npm client streams one chat completion from the gateway.
// Usage: node stream_chat.mjs BASE_URL API_KEY MODEL MESSAGES_JSON
// Prints one JSON line: {text, chunks, finish_reason, usage}; on an API error, {status, error} and exit 3.
import OpenAI from "openai";

const [baseURL, apiKey, model, messages] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 60_000 });
try {
  const stream = await client.chat.completions.create({
    model,
    messages: JSON.parse(messages),
    max_tokens: 8,
    temperature: 0,
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = "";
  let chunks = 0;
  let finish_reason = null;
  let usage = null;
  for await (const chunk of stream) {
    chunks += 1;
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices) {
      text += choice.delta?.content ?? "";
      finish_reason = choice.finish_reason ?? finish_reason;
    }
  }
  console.log(JSON.stringify({ text, chunks, finish_reason, usage }));
} catch (err) {
  if (err instanceof OpenAI.APIError) {
    console.log(JSON.stringify({ status: err.status, error: err.error ?? null }));
    process.exit(3);
  }
  throw err;
}
