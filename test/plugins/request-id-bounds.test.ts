import t from 'tap'
import { buildTestApp } from '../helpers/app.js'

/**
 * The contract: every answer carries `x-request-id`, the caller's when it matches
 * `^[A-Za-z0-9._:-]{1,128}$`, else a generated one. The suite refused 129 characters; nothing
 * showed that 128 are kept, nor every character the pattern allows.
 */

const GENERATED = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/

t.test('a caller id of 1 to 128 characters of the pattern is kept on every kind of answer; anything else is replaced', async (t) => {
  const { app } = await buildTestApp(t)
  const longest = 'AZaz09._:-'.repeat(13).slice(0, 128)
  t.equal(longest.length, 128)
  const kept = [longest, 'a', 'Z', '0', '.', '_', ':', '-', 'trace:span.1_a-B']
  const replaced = [`${longest}x`, 'has space', 'slash/', 'plus+', 'é', 'comma,']
  // A 200, a 404, a 401, a 400 (a malformed body): the route's answers and Fastify's own.
  const requests = [
    { method: 'GET' as const, url: '/healthz' },
    { method: 'GET' as const, url: '/no-such-route' },
    { method: 'GET' as const, url: '/appointments' },
    { method: 'POST' as const, url: '/auth/session', headers: { 'content-type': 'application/json' }, payload: '{"idToken":' }
  ]
  for (const request of requests) {
    for (const id of kept) {
      const answer = await app.inject({ ...request, headers: { ...request.headers, 'x-request-id': id } })
      t.equal(answer.headers['x-request-id'], id, `${request.method} ${request.url} (${answer.statusCode}) keeps ${JSON.stringify(id.slice(0, 20))} (${id.length})`)
    }
    for (const id of replaced) {
      const answer = await app.inject({ ...request, headers: { ...request.headers, 'x-request-id': id } })
      t.match(answer.headers['x-request-id'], GENERATED, `${request.method} ${request.url} (${answer.statusCode}) replaces ${JSON.stringify(id.slice(0, 20))} (${id.length})`)
    }
  }
})
