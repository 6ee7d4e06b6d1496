import t, { type Test } from 'tap'
import type { LightMyRequestResponse } from 'fastify'
import { createServer, type AddressInfo } from 'node:net'
import { once } from 'node:events'
import { parseHttpDate, parseRetryAfter } from '../../src/care360/client.js'
import { buildTestApp, signIn } from '../helpers/app.js'

/**
 * Retry-After is delay-seconds or an HTTP-date (RFC 9110 10.2.3), and an HTTP-date is one of three
 * fixed forms (5.6.7). Any other text is no Retry-After: the cooldown backs off (1 s first), as when
 * the header is missing. Date.parse reads almost anything with a letter and a number in it as a
 * date ("x 3000" is the year 3000, "later, 2099" the year 2099, "Retry 2" February 2001), so a
 * garbled header stopped every replica's upstream calls for the clamp's whole 10 minutes.
 * (Found by test/care360/answer-fuzz.test.ts.)
 */

const NOW = Date.parse('2030-01-01T00:00:00Z')

/** A patient's list through an app whose upstream is a raw server answering `answer`, exactly as written. */
async function listFrom (t: Test, answer: string, email: string): Promise<LightMyRequestResponse> {
  const server = createServer((socket) => {
    socket.on('error', () => {})
    socket.once('data', () => socket.end(answer))
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  t.teardown(() => server.close())
  const { app, issuer } = await buildTestApp(t, { upstreamUrl: `http://127.0.0.1:${(server.address() as AddressInfo).port}` })
  const token = await signIn(app, issuer, email)
  return await app.inject({ url: '/appointments', headers: { authorization: `Bearer ${token}` } })
}

t.test('text that is not an HTTP-date is no Retry-After', async (t) => {
  for (const garbage of ['x 3000', 'later, 2099', 'Retry 2', 'in 2099 maybe', 'Jan 2099', '2099 Jan 01']) {
    t.equal(parseRetryAfter(garbage, NOW), null, JSON.stringify(garbage))
  }
})

t.test('the three forms of an HTTP-date are still read', async (t) => {
  t.equal(parseRetryAfter('Tue, 01 Jan 2030 00:00:42 GMT', NOW), 42_000, 'IMF-fixdate')
  t.equal(parseRetryAfter('Tuesday, 01-Jan-30 00:00:42 GMT', NOW), 42_000, 'RFC 850')
  t.equal(parseRetryAfter('Tue Jan  1 00:00:42 2030', NOW), 42_000, 'asctime')
  t.equal(parseRetryAfter(new Date(NOW + 5000).toUTCString(), NOW), 5000, 'as Date#toUTCString writes it')
  t.equal(parseRetryAfter('Tue, 01 Foo 2030 00:00:42 GMT', NOW), null, 'in the form of a date, but no date')
})

t.test('an HTTP-date is the whole text, its year two or four digits', async (t) => {
  // Text around a date is no date: an RFC 850 date is rebuilt from its parts (rfc850Time), which
  // would drop it. A 3-digit year is no form of HTTP-date (Date.parse reads the year 994).
  for (const garbage of ['x 3000 Tuesday, 01-Jan-30 00:00:42 GMT', 'Tuesday, 01-Jan-30 00:00:42 GMT x 3000', 'Tue, 01 Jan 030 00:00:42 GMT', 'Sun, 06 Nov 994 08:49:37 GMT']) {
    t.equal(parseHttpDate(garbage, NOW), null, JSON.stringify(garbage))
  }
})

t.test('an asctime date carries no zone and is read as GMT, whatever the process\'s time zone', async (t) => {
  const zone = process.env.TZ
  process.env.TZ = 'America/New_York'
  t.teardown(() => {
    if (zone === undefined) delete process.env.TZ
    else process.env.TZ = zone
  })
  t.equal(new Date(NOW).getHours(), 19, 'the zone is in effect (19:00 on New Year\'s Eve)')
  t.equal(parseRetryAfter('Tue Jan  1 00:00:42 2030', NOW), 42_000)
})

t.test('an upstream 429 with a garbled Retry-After: the first backoff, not a 10-minute stop', async (t) => {
  // A raw upstream: Retry-After exactly as written.
  const list = await listFrom(t, 'HTTP/1.1 429 Too Many Requests\r\nretry-after: x 3000\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}', 'garbled-retry@example.com')
  t.equal(list.statusCode, 429)
  t.equal(list.json().code, 'UPSTREAM_RATE_LIMITED')
  t.ok(Number(list.headers['retry-after']) <= 2, `Retry-After ${String(list.headers['retry-after'])}: the first backoff (1 to 1.25 s)`)
})

t.test('a Date that is not an HTTP-date is no clock of the upstream\'s: a Retry-After date is read against ours', async (t) => {
  // "x 3000" read as the year 3000 made a Retry-After 30 s ahead lie in the past: a 1 s cooldown.
  const retryAt = new Date(Date.now() + 30_000).toUTCString()
  const list = await listFrom(t, `HTTP/1.1 429 Too Many Requests\r\ndate: x 3000\r\nretry-after: ${retryAt}\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}`, 'garbled-date@example.com')
  t.equal(list.statusCode, 429)
  const seconds = Number(list.headers['retry-after'])
  t.ok(seconds >= 28 && seconds <= 31, `Retry-After ${String(list.headers['retry-after'])}: the upstream's 30 s`)
})

t.test('a Date with whitespace after it is still the upstream\'s clock', async (t) => {
  // undici keeps what follows a field's value; a Date with trailing spaces is still the date. The
  // upstream's clock an hour behind ours: its Retry-After, 30 s after its Date, is 30 s, not the past.
  const upstreamNow = Date.now() - 3_600_000
  const list = await listFrom(t, `HTTP/1.1 429 Too Many Requests\r\ndate: ${new Date(upstreamNow).toUTCString()} \t \r\nretry-after: ${new Date(upstreamNow + 30_000).toUTCString()}\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}`, 'spaced-date@example.com')
  t.equal(list.statusCode, 429)
  const seconds = Number(list.headers['retry-after'])
  t.ok(seconds >= 28 && seconds <= 31, `Retry-After ${String(list.headers['retry-after'])}: the upstream's 30 s`)
})
