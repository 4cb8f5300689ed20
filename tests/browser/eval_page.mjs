// Attaches playwright-core to a running Chromium (devstack), opens a page served on loopback,
// awaits `window[fn](arg)` defined by that page and prints its result as one JSON line.
// Usage: node eval_page.mjs <devtools_url> <page_url> <fn> [json_arg]
import { chromium } from "playwright-core";

const [devtoolsUrl, pageUrl, fn, rawArg] = process.argv.slice(2);
const arg = rawArg === undefined ? null : JSON.parse(rawArg);
const browser = await chromium.connectOverCDP(devtoolsUrl);
try {
  const context = browser.contexts()[0] ?? (await browser.newContext());
  const page = await context.newPage();
  const consoleLines = [];
  page.on("console", (msg) => consoleLines.push(`${msg.type()}: ${msg.text()}`));
  await page.goto(pageUrl);
  const result = await page.evaluate(([name, a]) => window[name](a), [fn, arg]);
  console.log(JSON.stringify({ result, console: consoleLines }));
  await page.close();
} finally {
  await browser.close();
}
