// Loads the status page in a real headless Chromium, checks what it shows,
// clicks a breaker's Reset button, checks the page after the reload, and saves
// screenshots. Also proves the page's Content-Security-Policy does not break
// it: the headers are there, the styles apply, the form post works, and the
// browser reports no CSP violation (while an injected style is refused).
// Usage: node status_page.mjs <admin base URL> <route> <screenshot dir>
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";

const [base, route, outDir] = process.argv.slice(2);
mkdirSync(outDir, { recursive: true });
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const fail = async (msg) => { console.error(msg); await browser.close(); process.exit(1); };
try {
  // a phone-sized viewport: the page must be usable there
  const page = await browser.newPage({ viewport: { width: 412, height: 915 } });
  // Chromium reports each CSP violation as a console error
  const violations = [];
  page.on("console", (m) => {
    if (/Content Security Policy/i.test(m.text())) violations.push(m.text());
  });
  page.on("pageerror", (e) => violations.push(String(e)));
  const resp = await page.goto(base + "/");
  const headers = resp.headers();
  const csp = headers["content-security-policy"] || "";
  if (!csp.includes("default-src 'none'") || !csp.includes("style-src 'sha256-"))
    await fail(`no or a weak Content-Security-Policy: ${csp}`);
  if (headers["x-frame-options"] !== "DENY") await fail(`X-Frame-Options: ${headers["x-frame-options"]}`);
  if ((await page.textContent("h1")) !== "cognigy-gateway") await fail("no page title");
  // the inline style applied (allowed by its hash): sections are white cards
  const bg = await page.evaluate(() => getComputedStyle(document.querySelector("section")).backgroundColor);
  if (bg !== "rgb(255, 255, 255)") await fail(`the page's style was not applied (section background ${bg})`);
  const row = page.locator(`tr[data-route="${route}"]`);
  const state = (await row.locator(".state").textContent()).trim();
  if (!state.startsWith("open")) await fail(`route ${route} should be open, page shows: ${state}`);
  if (!(await page.textContent("#reload")).includes("applied")) await fail("last reload not shown");
  if (!(await page.locator("#dead-letters").count())) await fail("no dead-letter section");
  await page.screenshot({ path: `${outDir}/status-page-open.png`, fullPage: true });
  await Promise.all([page.waitForNavigation(), row.locator("button", { hasText: "Reset" }).click()]);
  const after = (await page.locator(`tr[data-route="${route}"] .state`).textContent()).trim();
  if (after !== "closed") await fail(`after Reset the route should be closed, page shows: ${after}`);
  await page.setViewportSize({ width: 1280, height: 800 });
  await page.screenshot({ path: `${outDir}/status-page.png`, fullPage: true });
  if (violations.length) await fail(`CSP violations:\n${violations.join("\n")}`);
  // the policy is in force: a style the page did not ship is refused (and reported)
  const color = await page.evaluate(() => {
    const s = document.createElement("style");
    s.textContent = "h1{color:rgb(1, 2, 3)}";
    document.head.appendChild(s);
    return getComputedStyle(document.querySelector("h1")).color;
  });
  if (color === "rgb(1, 2, 3)") await fail("an injected inline style applied: the CSP is not in force");
  for (let i = 0; i < 20 && !violations.length; i++) await page.waitForTimeout(50);
  if (!violations.length) await fail("the refused style was not reported: the console check sees nothing");
  console.log(`ok: ${route} open → Reset → closed, no CSP violation; screenshots in ${outDir}`);
} catch (e) {
  await fail(String(e));
}
await browser.close();
