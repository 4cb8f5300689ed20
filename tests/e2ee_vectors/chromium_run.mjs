// Attaches playwright-core to a running Chromium (devstack), opens chromium.html (served on
// loopback), runs the jobs file through livekit-client's worker there and prints
// {"version", "browser", "jobs"} as one JSON line.
// Usage: node chromium_run.mjs <devtools_url> <page_url> <jobs.json>
import { readFileSync } from 'node:fs';
import { chromium } from 'playwright-core';

const [devtoolsUrl, pageUrl, jobsPath] = process.argv.slice(2);
const { jobs } = JSON.parse(readFileSync(jobsPath, 'utf8'));
const pkg = JSON.parse(
  readFileSync(new URL('../../node_modules/livekit-client/package.json', import.meta.url), 'utf8'),
);
const browser = await chromium.connectOverCDP(devtoolsUrl);
try {
  const context = browser.contexts()[0] ?? (await browser.newContext());
  const page = await context.newPage();
  const consoleLines = [];
  page.on('console', (msg) => consoleLines.push(`${msg.type()}: ${msg.text()}`));
  page.on('pageerror', (err) => consoleLines.push(`pageerror: ${err.message}`));
  await page.goto(pageUrl);
  await page.waitForFunction(() => typeof window.runLivekitJobs === 'function');
  const results = await page.evaluate((j) => window.runLivekitJobs(j), jobs);
  const ua = await page.evaluate(() => navigator.userAgent);
  await page.close();
  console.log(JSON.stringify({ version: pkg.version, browser: ua, jobs: results, console: consoleLines }));
} finally {
  await browser.close();
}
