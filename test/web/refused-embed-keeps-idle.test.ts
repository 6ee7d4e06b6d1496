import { setTimeout as sleep } from 'node:timers/promises'
import t from 'tap'
import { Browser } from './browser.js'
import { SESSION_COOKIE, startWebStack } from './stack.js'

/**
 * A session ends after SESSION_IDLE_TTL without its patient's use (a shared device left alone).
 * The embed check refuses a sibling page's `<img>` GETs (and foreign fetches) because they are not
 * the app's, and they count nothing against the session's limits; yet the lookup that preceded
 * the refusal slid the session's idle expiry, so a page left open kept its visitor's session alive
 * up to its absolute lifetime (12 h by default) with requests the service itself refused.
 */

const IMAGE = { 'sec-fetch-site': 'same-site', 'sec-fetch-mode': 'no-cors', 'sec-fetch-dest': 'image' }

for (const redis of [false, true]) {
  t.test(`a refused embedded GET does not keep the session from idling out (${redis ? 'Redis' : 'memory'})`, async (t) => {
    const stack = await startWebStack(t, { redis, env: { CORS_ORIGINS: 'https://app.example.com', SESSION_IDLE_TTL: '2s', SESSION_ABSOLUTE_TTL: '1h' } })
    const browser = new Browser()
    await stack.signIn(browser, 'alice@example.com')
    const cookie = stack.sessionOf(browser) as string
    const signedInAt = Date.now()

    // The sibling page loads an image now and then; each is refused.
    for (const at of [900, 1500]) {
      await sleep(Math.max(0, signedInAt + at - Date.now()))
      const embed = await stack.app.inject({ method: 'GET', url: '/auth/me', headers: IMAGE, cookies: { [SESSION_COOKIE]: cookie } })
      t.equal(embed.statusCode, 403, 'the embed is refused')
    }
    // More than the idle lifetime after the patient's last own request (the sign-in).
    await sleep(Math.max(0, signedInAt + 2400 - Date.now()))
    const me = await stack.app.inject({ method: 'GET', url: '/auth/me', cookies: { [SESSION_COOKIE]: cookie } })
    t.equal(me.statusCode, 200)
    t.match(me.json(), { data: { authenticated: false } }, 'the session idled out: refused requests are no use of it')
  })
}
