// Signs in to the admin listener in a real headless Chromium, through the
// login form, under the admin pages' Content-Security-Policy: the form renders
// with its style, posts (same origin: the cross-site check lets it through),
// and sets a session cookie that is not the token, HttpOnly, SameSite=Strict,
// for at most 12 h, with which the status page loads. No CSP violation.
// Usage: node sign_in.mjs <admin base URL> <admin token>
import { chromium } from "playwright-core";

const [base, token] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const fail = async (msg) => { console.error(msg); await browser.close(); process.exit(1); };
try {
  const context = await browser.newContext();
  const page = await context.newPage();
  const violations = [];
  page.on("console", (m) => {
    if (/Content Security Policy/i.test(m.text())) violations.push(m.text());
  });
  await page.goto(base + "/");
  if (!page.url().endsWith("/login")) await fail(`not sent to the login form: ${page.url()}`);
  if ((await page.textContent("h1")) !== "Admin sign-in") await fail("no login form");
  // the login page's inline style applied (allowed by its hash)
  const width = await page.evaluate(() => getComputedStyle(document.body).maxWidth);
  if (width !== "384px") await fail(`the login page's style was not applied (max-width ${width})`);
  await page.fill("input[name=token]", token);
  await Promise.all([page.waitForNavigation(), page.click("button[type=submit]")]);
  if ((await page.textContent("h1")) !== "cognigy-gateway")
    await fail(`not signed in: ${page.url()} ${(await page.content()).slice(0, 300)}`);
  const cookie = (await context.cookies()).find((c) => c.name === "gateway_admin");
  if (!cookie) await fail("no session cookie");
  if (cookie.value.includes(token)) await fail("the cookie holds the token");
  if (!cookie.httpOnly || cookie.sameSite !== "Strict") await fail(`cookie flags: ${JSON.stringify(cookie)}`);
  const left = cookie.expires - Date.now() / 1000;
  if (!(left > 0 && left <= 12 * 3600 + 5)) await fail(`cookie lifetime ${left}s`);
  if (violations.length) await fail(`CSP violations:\n${violations.join("\n")}`);
  console.log("ok: signed in through the form; session cookie is HttpOnly, SameSite=Strict, 12 h");
} catch (e) {
  await fail(String(e));
}
await browser.close();
