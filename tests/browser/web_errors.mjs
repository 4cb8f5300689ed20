// The web client's messages for what goes wrong before a call: an unreachable homeserver, a
// wrong password, camera/microphone permission denied. Prints one JSON line.
// Usage: node web_errors.mjs <devtools_url> <json options: base, homeserver, user, password, roomId>
import { chromium } from "playwright-core";

const [devtoolsUrl, raw] = process.argv.slice(2);
const o = JSON.parse(raw);
const browser = await chromium.connectOverCDP(devtoolsUrl);
const context = await browser.newContext();
const out = {};
const alertText = async (page) => {
  await page.waitForSelector("[role=alert]", { timeout: 15000 });
  return (await page.textContent("[role=alert]")).trim();
};
try {
  let page = await context.newPage();
  // Nothing listens on port 9 of this namespace's loopback.
  await page.goto(`${o.base}/index.html?hs=${encodeURIComponent("http://127.0.0.1:9")}`);
  await page.fill("#user", o.user);
  await page.fill("#password", o.password);
  await page.click("button[type=submit]");
  out.unreachable = await alertText(page);
  out.blank = (await page.textContent("body")).trim().length === 0;

  await page.goto(`${o.base}/index.html?hs=${encodeURIComponent(o.homeserver)}`);
  await page.fill("#user", o.user);
  await page.fill("#password", "not-the-password");
  await page.click("button[type=submit]");
  out.wrongPassword = await alertText(page);
  await page.close();

  // The browser refuses the camera and microphone.
  page = await context.newPage();
  await page.addInitScript(() => {
    navigator.mediaDevices.getUserMedia = async () => {
      throw new DOMException("Permission denied", "NotAllowedError");
    };
  });
  await page.goto(`${o.base}/index.html?hs=${encodeURIComponent(o.homeserver)}`);
  await page.fill("#user", o.user);
  await page.fill("#password", o.password);
  await page.click("button[type=submit]");
  await page.click(`button.room[data-room-id="${o.roomId}"]`, { timeout: 30000 });
  out.permission = await alertText(page);
  out.joinDisabled = await page.isDisabled("#join");
  out.ok = true;
} catch (e) {
  out.ok = false;
  out.error = String(e);
} finally {
  console.log(JSON.stringify(out));
  await context.close().catch(() => {});
  await browser.close().catch(() => {});
}
