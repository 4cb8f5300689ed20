// The web client as the one being rung: log in, print {"ready": true} once the room list shows,
// wait for the incoming-call dialog, read it, press Decline (keyboard), wait until the decline is sent, print the result.
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
  // The dialog goes away before the decline is sent: wait for the homeserver's answer to the
  // send, or closing the context below can abort it (seen in a CI check under load).
  const sent = page.waitForResponse(
    (r) => r.request().method() === "PUT" && r.url().includes("rtc.decline"),
    { timeout: 30000 },
  );
  await dialog.getByRole("button", { name: "Decline" }).focus();
  await page.keyboard.press("Enter");
  await dialog.waitFor({ state: "detached", timeout: 10000 });
  out.declineStatus = (await sent).status();
  out.ok = out.declineStatus === 200;
} catch (e) {
  out.ok = false;
  out.error = String(e);
} finally {
  console.log(JSON.stringify(out));
  await context.close().catch(() => {});
  await browser.close().catch(() => {});
}
