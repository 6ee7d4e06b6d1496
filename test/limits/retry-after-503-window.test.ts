import t from 'tap'
import { parseList, type Item } from 'structured-headers'
import { buildTestApp } from '../helpers/app.js'

/**
 * retry-after-window.test.ts for a 503: the last session raised the Retry-After of a 429 or a 503
 * (sendError, answers.ts) to the end of a window its answer reports spent (r=0,
 * draft-ietf-httpapi-ratelimit-headers-11 section 6). Only 429s were tested: leaving the 503s out
 * passed every test (found by a mutation review). A client that obeys a session store's
 * `Retry-After: 1` while the same answer says its address has no request left for a minute comes
 * back into the per-IP 429.
 */
t.test('a 503 (session store down) whose answer reports the per-IP policy spent: Retry-After reaches the end of that window', async (t) => {
  const start = Date.now()
  const { app, redis } = await buildTestApp(t, { redis: true, now: () => start, env: { RATE_LIMIT_IP: '2/1m' } })
  await redis?.stop()
  const me = { url: '/auth/me', headers: { authorization: `Bearer ${'A'.repeat(43)}` } }
  const first = await app.inject(me)
  t.equal(first.statusCode, 503, 'the session is looked up, and Redis is down')
  t.equal(first.headers['retry-after'], '1', 'the store\'s own Retry-After while the window has requests left')
  const second = await app.inject(me)
  t.equal(second.statusCode, 503)
  const ip = (parseList(String(second.headers.ratelimit)) as Item[]).find((item) => item[0] === 'ip')
  t.equal(ip?.[1].get('r'), 0, 'the answer reports the per-IP policy spent')
  t.equal(second.headers['retry-after'], String(ip?.[1].get('t')), 'Retry-After is not earlier than its window\'s end')
})
