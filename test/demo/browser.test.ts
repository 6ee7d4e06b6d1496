import { existsSync } from 'node:fs'
import { mkdir, mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t, { type Test } from 'tap'
import { chromium, type BrowserContext, type Page } from 'playwright-core'
import { startDemo, type Demo } from '../../demo/stack.js'

/**
 * The demo in a real browser (Debian's chromium, headless): sign in at the development IdP, list,
 * cancel, see an upstream failure rendered, sign out; and check from page JavaScript that the
 * session cookie cannot be read. The page (localhost:A) and the service (localhost:B) are
 * different origins of one site: cookies are shared by host, not by port, so a session cookie
 * without HttpOnly would show up in the page's `document.cookie`.
 */

// Child processes and a browser start slowly on a busy 2-core CI machine: more than the
// suite's 60 s per file, still bounded.
t.setTimeout(180_000)

const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium'
const ARTIFACTS = 'test-artifacts'
const SESSION_COOKIE = '__Host-bff-session'
const ALICE = 'alice@example.com'

// Developers without Chromium skip; CI never does (.ci/run installs it, and a missing one fails).
const skip = !existsSync(CHROMIUM) && process.env.CI === undefined
  ? `no Chromium at ${CHROMIUM} (apt-get install -y chromium); CI always runs this test`
  : false

t.test('the patient web page signs in, cancels, renders errors and signs out', { skip }, async (t) => {
  const demo = await startDemo({ ports: { service: 0, idp: 0, sandbox: 0, page: 0 }, logLevel: 'silent' })
  t.teardown(() => demo.close())
  const userDataDir = await mkdtemp(join(tmpdir(), 'bff-chromium-'))
  t.teardown(() => rm(userDataDir, { recursive: true, force: true }))
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    timeout: 30_000
  })
  t.teardown(() => context.close())
  context.setDefaultTimeout(10_000)
  await mkdir(ARTIFACTS, { recursive: true })
  const page = context.pages()[0] ?? await context.newPage()
  const scriptErrors: string[] = []
  page.on('pageerror', (error) => { scriptErrors.push(error.message) })
  // Loopback only: the IdP's stock logout page links a web font, which is never fetched.
  await context.route((url) => !['localhost', '127.0.0.1', '[::1]'].includes(url.hostname), (route) => route.abort('blockedbyclient'))

  try {
    await journey(t, demo, context, page)
  } catch (error) {
    await page.screenshot({ path: join(ARTIFACTS, 'demo-failure.png'), fullPage: true }).catch(() => {})
    throw error
  }
  t.same(scriptErrors, [], 'no script errors on the page')
})

async function appointmentIds (page: Page): Promise<string[]> {
  return await page.locator('#appointments li').evaluateAll((items) => items.map((item) => (item as unknown as { dataset: { id?: string } }).dataset.id ?? ''))
}

async function journey (t: Test, demo: Demo, context: BrowserContext, page: Page): Promise<void> {
  const alice = demo.patients.find((patient) => patient.email === ALICE)
  const [first, second] = alice?.appointments ?? []
  if (first === undefined || second === undefined) throw new Error('the demo seed lost its appointments')

  await page.goto(demo.urls.page)
  await page.locator('#who[data-state="signed-out"]').waitFor()
  t.ok(await page.locator('#sign-in').isVisible(), 'signed out: a sign-in link')

  // Sign in: the service redirects to the IdP's one-click page, and back.
  await page.click('#sign-in')
  await page.waitForURL((url) => url.href.startsWith(`${demo.urls.idp}/interaction/`))
  await page.click(`button[value="${ALICE}"]`)
  await page.waitForURL((url) => !url.href.startsWith(demo.urls.idp))
  const landed = page.url()
  const onPage = landed.startsWith(demo.urls.page)
  t.ok(onPage, `sign-in ends on the web app (${landed})`)
  if (!onPage) await page.goto(demo.urls.page)

  await page.locator('#who[data-state="signed-in"]').waitFor()
  t.match(await page.locator('#who').textContent(), `Signed in as ${ALICE}`)
  t.notOk(await page.locator('#sign-in').isVisible(), 'signed in: no sign-in link')
  t.ok(await page.locator('#sign-out').isVisible(), 'signed in: a sign-out button')
  await page.locator('#appointments li').first().waitFor()
  t.same(await appointmentIds(page), alice?.appointments.map((appointment) => appointment.id), "alice's appointments listed")

  // The session cookie exists, HttpOnly, and page JavaScript cannot read it.
  const cookies = await context.cookies(demo.urls.service)
  const session = cookies.find((cookie) => cookie.name === SESSION_COOKIE)
  t.ok(session, 'the browser holds the session cookie')
  t.equal(session?.httpOnly, true, 'HttpOnly')
  t.equal(session?.secure, true, 'Secure')
  t.equal(session?.sameSite, 'Strict', 'SameSite=Strict')
  // Runs in the page: its `document`, not Node's.
  const visible = await page.evaluate(() => (globalThis as unknown as { document: { cookie: string } }).document.cookie)
  t.notOk(visible.includes(SESSION_COOKIE), 'document.cookie does not show the session cookie')

  // Cancel the first appointment with a reason.
  const item = page.locator(`#appointments li[data-id="${first.id}"]`)
  await item.locator('input[name="reason"]').fill('Feeling better')
  await item.locator('button[type="submit"]').click()
  await page.locator('#messages', { hasText: 'Cancelled' }).waitFor()
  await item.waitFor({ state: 'detached' })
  t.same(await appointmentIds(page), alice?.appointments.slice(1).map((appointment) => appointment.id), 'the cancelled appointment is gone')
  t.ok(demo.sandbox.isCancelled(first.id), 'the sandbox cancelled it')
  const cancels = demo.sandbox.calls.filter((call) => call.method === 'POST')
  t.equal(cancels.length, 1, 'one cancel reached Care360')
  t.same(cancels[0]?.body, { email: ALICE, appointmentId: first.id, reason: 'Feeling better' }, 'with the session email and the reason')
  t.equal(cancels[0]?.headers['cv-api-key'], demo.sandboxKey, 'the key is attached by the service')
  t.notOk(cancels[0]?.headers.cookie, 'no cookie forwarded')
  await page.screenshot({ path: join(ARTIFACTS, 'demo-signed-in.png'), fullPage: true })

  // An upstream failure, set from the page's demo controls, is rendered with its code.
  await page.locator('#sandbox-controls summary').click()
  await page.selectOption('#failure', 'status-503')
  await page.click('#set-failure')
  await page.locator('#messages', { hasText: 'will fail' }).waitFor()
  await page.click('#refresh')
  await page.locator('#errors', { hasText: 'UPSTREAM_ERROR' }).waitFor()
  t.match(await page.locator('#errors').textContent(), /Status 502, code UPSTREAM_ERROR, request \S+/, 'error: status, code and request id')

  // Care360's own 429: the page shows the code and how long to wait.
  await page.selectOption('#failure', 'rate-limited')
  await page.click('#set-failure')
  await page.locator('#messages', { hasText: 'will fail' }).waitFor()
  await page.locator(`#appointments li[data-id="${second.id}"] button[type="submit"]`).click()
  await page.locator('#errors', { hasText: 'UPSTREAM_RATE_LIMITED' }).waitFor()
  t.match(await page.locator('#errors').textContent(), /please wait \d+ second/, '429: Retry-After rendered')
  t.notOk(demo.sandbox.isCancelled(second.id), 'the refused cancel did not happen')

  // Sign out: the session ends here, then at the IdP (its end-session page asks to confirm).
  await page.click('#sign-out')
  await page.waitForURL((url) => url.href.startsWith(demo.urls.idp))
  const confirm = page.locator('button[name="logout"], button[value="yes"]').first()
  await confirm.click()
  await page.waitForURL((url) => !url.href.startsWith(demo.urls.idp))
  if (!page.url().startsWith(demo.urls.page)) await page.goto(demo.urls.page)
  await page.locator('#who[data-state="signed-out"]').waitFor()
  const after = await context.cookies(demo.urls.service)
  t.notOk(after.some((cookie) => cookie.name === SESSION_COOKIE), 'the session cookie is cleared')
  const me = await page.evaluate(async (service) => (await (await fetch(`${service}/auth/me`, { credentials: 'include' })).json()) as { data: { authenticated: boolean } }, demo.urls.service)
  t.equal(me.data.authenticated, false, 'the service no longer knows the browser')
  await page.screenshot({ path: join(ARTIFACTS, 'demo-final.png'), fullPage: true })
}
