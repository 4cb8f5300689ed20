// Attaches playwright-core to a running Chromium (devstack), opens webrtc.html (served on
// loopback) and runs an encrypted loopback call; prints its result as one JSON line.
// Usage: node chromium_webrtc.mjs <devtools_url> <page_url> <key base64> <key index> <ms>
import { chromium } from 'playwright-core';

const [devtoolsUrl, pageUrl, key, index, ms] = process.argv.slice(2);
const browser = await chromium.connectOverCDP(devtoolsUrl);
try {
  const context = browser.contexts()[0] ?? (await browser.newContext());
  const page = await context.newPage();
  const consoleLines = [];
  page.on('console', (msg) => consoleLines.push(`${msg.type()}: ${msg.text()}`));
  page.on('pageerror', (err) => consoleLines.push(`pageerror: ${err.message}`));
  await page.goto(pageUrl);
  await page.waitForFunction(() => typeof window.runCall === 'function');
  const result = await page.evaluate(
    (args) => window.runCall(args),
    { key, index: Number(index), ms: Number(ms), maxFrames: 60 },
  );
  await page.close();
  console.log(JSON.stringify({ ...result, console: consoleLines }));
} finally {
  await browser.close();
}
