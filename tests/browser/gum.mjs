// Attaches playwright-core to a running Chromium (devstack), opens a page served on loopback,
// runs the page's own getUserMedia check and prints its result as one JSON line.
// Usage: node gum.mjs <devtools_url> <page_url>
import { chromium } from "playwright-core";

const [devtoolsUrl, pageUrl] = process.argv.slice(2);
const browser = await chromium.connectOverCDP(devtoolsUrl);
try {
  const context = browser.contexts()[0] ?? (await browser.newContext());
  const page = await context.newPage();
  const consoleLines = [];
  page.on("console", (msg) => consoleLines.push(`${msg.type()}: ${msg.text()}`));
  await page.goto(pageUrl);
  const result = await page.evaluate(() => window.checkCamera(1500));
  console.log(JSON.stringify({ ...result, console: consoleLines }));
  await page.close();
} finally {
  await browser.close();
}
