// Loads the status page in a real headless Chromium, checks what it shows,
// clicks a breaker's Reset button, checks the page after the reload, and saves
// screenshots. Usage: node status_page.mjs <admin base URL> <route> <screenshot dir>
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
  await page.goto(base + "/");
  if ((await page.textContent("h1")) !== "cognigy-gateway") await fail("no page title");
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
  console.log(`ok: ${route} open → Reset → closed; screenshots in ${outDir}`);
} catch (e) {
  await fail(String(e));
}
await browser.close();
