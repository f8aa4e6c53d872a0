// Drives the MSMQ web console in headless Chromium: signs in, waits for the
// tables and both charts to draw, pauses a plugin with its button and takes a
// screenshot. Prints one JSON line of what it saw; exits 1
// on any failure. Run by tests/e2e/console.rs, which starts the broker.
//
// Environment: CONSOLE_URL, CONSOLE_TOKEN (optional), CONSOLE_TOPIC (a topic
// that must be listed), CONSOLE_PLUGIN (the plugin to pause), SCREENSHOT
// (PNG path), CONSOLE_WATCH_MS (wait before the screenshot), CHROMIUM
// (default /usr/bin/chromium).
import { chromium } from "playwright-core";

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`${name} is not set`);
  return value;
};
const STEP_TIMEOUT_MS = 20000;

const browser = await chromium.launch({
  executablePath: env("CHROMIUM", "/usr/bin/chromium"),
  headless: true,
  chromiumSandbox: false,
  args: ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.setDefaultTimeout(STEP_TIMEOUT_MS);
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(env("CONSOLE_URL"));
  const token = process.env.CONSOLE_TOKEN;
  if (token) {
    await page.locator("#login").waitFor({ state: "visible" });
    await page.fill("#token", token);
    await page.click("#login button");
  }
  const topic = env("CONSOLE_TOPIC");
  await page.locator("#topics tbody td", { hasText: topic }).first().waitFor();

  // Both charts must have drawn two lines of at least three samples each.
  const inkOf = (id) => page.evaluate((id) => {
    const canvas = document.getElementById(id);
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    let coloured = 0;
    for (let i = 0; i < data.length; i += 4) {
      const [r, g, b, a] = [data[i], data[i + 1], data[i + 2], data[i + 3]];
      if (a > 0 && !(Math.abs(r - g) < 16 && Math.abs(g - b) < 16)) coloured++; // not grey: a line
    }
    return { points: Number(canvas.dataset.points || 0), coloured };
  }, id);
  await page.waitForFunction(() => ["chart-throughput", "chart-plugins"].every(
    (id) => Number(document.getElementById(id).dataset.points || 0) >= 6));
  const charts = { throughput: await inkOf("chart-throughput"), plugins: await inkOf("chart-plugins") };
  for (const [name, c] of Object.entries(charts)) {
    if (c.coloured < 50) throw new Error(`the ${name} chart drew no lines: ${JSON.stringify(c)}`);
  }

  const plugin = env("CONSOLE_PLUGIN");
  const status = page.locator(`td.status[data-plugin="${plugin}"]`);
  const before = (await status.textContent()).trim();
  await page.click(`button[data-action="pause"][data-plugin="${plugin}"]`);
  await page.waitForFunction((p) =>
    document.querySelector(`td.status[data-plugin="${p}"]`)?.textContent.startsWith("paused"), plugin);
  const after = (await status.textContent()).trim();

  const texts = (selector) => page.$$eval(selector, (cells) => cells.map((c) => c.textContent.trim()));
  const seen = {
    topics: await texts("#topics tbody tr td:first-child"),
    groups: await texts("#groups tbody tr td:first-child"),
    transactions: await texts("#transactions tbody tr td:first-child"),
    dead_letters: await texts("#dead-letters tbody tr td:first-child"),
    plugins: await texts("#plugins tbody tr td:first-child"),
    charts, status_before: before, status_after: after, page_errors: errors,
  };
  // Watch a little longer (CONSOLE_WATCH_MS) so the screenshot shows the charts moving on.
  await page.waitForTimeout(Number(process.env.CONSOLE_WATCH_MS || 1200));
  await page.screenshot({ path: env("SCREENSHOT"), fullPage: true });
  if (errors.length) throw new Error(`page errors: ${errors.join("; ")}`);
  console.log(JSON.stringify(seen));
} finally {
  await browser.close();
}
