// The openai npm package through kimi-rotate, as a VS Code extension (Roo Code) would call Kimi.
// Usage: node chat.mjs <baseURL> <proxyURL> [stream]; trust comes from NODE_EXTRA_CA_CERTS.
// Prints one JSON line: {"text": ..., "events": n}.
import OpenAI from "openai";
import { ProxyAgent, fetch as undiciFetch } from "undici";

const [baseURL, proxyURL, mode] = process.argv.slice(2);
const dispatcher = new ProxyAgent(proxyURL);
const client = new OpenAI({
  apiKey: "placeholder-not-a-key",
  baseURL,
  maxRetries: 0,
  fetch: (url, init) => undiciFetch(url, { ...init, dispatcher }),
});
const request = { model: "kimi-k2.6", messages: [{ role: "user", content: "hi" }] };

if (mode === "stream") {
  const stream = await client.chat.completions.create({ ...request, stream: true });
  let text = "";
  let events = 0;
  for await (const chunk of stream) {
    events += 1;
    text += chunk.choices[0]?.delta?.content ?? "";
  }
  console.log(JSON.stringify({ text, events }));
} else {
  const reply = await client.chat.completions.create(request);
  console.log(JSON.stringify({ text: reply.choices[0].message.content, events: 0 }));
}
