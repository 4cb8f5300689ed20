// The web client as the one being rung: log in, print {"ready": true} once the room list shows,
// wait for the incoming-call dialog, read it, press Decline (keyboard), print the result.
// Usage: node web_ring.mjs <devtools_url> <json options: base, homeserver, user, password>
import { chromium } from "playwright-core";

const [devtoolsUrl, raw] = process.argv.slice(2);
const o = JSON.parse(raw);
const browser = await chromium.connectOverCDP(devtoolsUrl);
const context = await browser.newContext();
const out = {};
try {
  const page = await context.newPage();
  await page.goto(`${o.base}/index.html?hs=${encodeURIComponent(o.homeserver)}`);
  await page.fill("#user", o.user);
  await page.fill("#password", o.password);
  await page.click("button[type=submit]");
  await page.waitForSelector("h1#rooms-title", { timeout: 30000 });
  console.log(JSON.stringify({ ready: true }));
  const dialog = page.locator("#ring[role=alertdialog]");
  await dialog.waitFor({ timeout: 60000 });
  out.text = (await page.textContent("#ring-title")).trim();
  out.buttons = await dialog.locator("button").allTextContents();
  await dialog.getByRole("button", { name: "Decline" }).focus();
  await page.keyboard.press("Enter");
  await dialog.waitFor({ state: "detached", timeout: 10000 });
  out.ok = true;
} catch (e) {
  out.ok = false;
  out.error = String(e);
} finally {
  console.log(JSON.stringify(out));
  await context.close().catch(() => {});
  await browser.close().catch(() => {});
}
