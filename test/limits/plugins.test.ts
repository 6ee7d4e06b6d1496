import t from 'tap'
import { parseItem, parseList, type Item } from 'structured-headers'
import { startRedis } from '../helpers/redis.js'
import { buildTestApp, signIn } from '../helpers/app.js'
import { limitedApp, sessionHeaders } from './fixtures/app.js'
import { steppedWallClock } from './fixtures/support.js'
import { clientAddress, proxyTrust } from '../../src/limits/plugins.js'
import { retryAfterSeconds } from '../../src/limits/headers.js'

const redis = await startRedis(t)

/** The fields as a policy -> parameters map, through a structured-field parser. */
function fields (headers: Record<string, unknown>): { policy: Record<string, Record<string, unknown>>, limit: Record<string, Record<string, unknown>> } {
  const asMap = (list: Array<Item | unknown>): Record<string, Record<string, unknown>> => {
    const out: Record<string, Record<string, unknown>> = {}
    for (const member of list as Item[]) {
      if (typeof member[0] !== 'string') throw new Error('policy names are Strings')
      out[member[0]] = Object.fromEntries(member[1])
    }
    return out
  }
  return {
    policy: asMap(parseList(String(headers['ratelimit-policy']))),
    limit: asMap(parseList(String(headers.ratelimit)))
  }
}

t.test('per IP: one counter across routes and the not-found handler, counted in Redis', async (t) => {
  await redis.flush()
  const app = await limitedApp(t, { redisUrl: redis.url, env: { RATE_LIMIT_IP: '3/1m' } })
  const first = await app.inject({ url: '/a' })
  t.equal(first.statusCode, 200)
  t.same(fields(first.headers), { policy: { ip: { q: 3, w: 60 } }, limit: { ip: { r: 2, t: 60 } } })
  t.notOk(Object.keys(first.headers).some((name) => name.startsWith('x-ratelimit')), 'none of the plugin\'s own fields')
  t.equal((await app.inject({ url: '/b' })).statusCode, 200)
  const notFound = await app.inject({ url: '/nowhere' })
  t.equal(notFound.statusCode, 404)
  t.same(fields(notFound.headers).limit, { ip: { r: 0, t: 60 } })
  const refused = await app.inject({ url: '/a' })
  t.equal(refused.statusCode, 429)
  t.same(refused.json(), { status: 429, success: false, message: 'Rate limit exceeded', code: 'RATE_LIMITED' })
  t.equal(parseItem(String(refused.headers['retry-after']))[0], 60, 'Retry-After in seconds')
  t.same(fields(refused.headers).limit, { ip: { r: 0, t: 60 } })
  t.equal(refused.headers['x-request-id'] !== undefined && refused.headers['cache-control'], 'no-store', 'still stamped')
  const client = app.sharedState.redis
  t.equal(await client?.get('bff:limit:ip:127.0.0.1'), '4')
})

for (const store of ['memory', 'redis'] as const) {
  t.test(`${store}: per session and per cancel: counted apart, all policies published`, async (t) => {
    if (store === 'redis') await redis.flush()
    const app = await limitedApp(t, { ...(store === 'redis' ? { redisUrl: redis.url } : {}), env: { RATE_LIMIT_IP: '100/1m', RATE_LIMIT_SESSION: '3/1m', RATE_LIMIT_CANCEL: '1/30s' } })
    const one = await sessionHeaders(app)
    const two = await sessionHeaders(app)
    const anonymous = await app.inject({ url: '/a' })
    t.same(Object.keys(fields(anonymous.headers).policy), ['ip'], 'no session, no session policy')
    const withSession = await app.inject({ url: '/a', headers: one.headers })
    t.same(fields(withSession.headers), {
      policy: { ip: { q: 100, w: 60 }, session: { q: 3, w: 60 } },
      limit: { ip: { r: 98, t: 60 }, session: { r: 2, t: 60 } }
    })
    const cancel = await app.inject({ method: 'POST', url: '/cancel', headers: one.headers })
    t.equal(cancel.statusCode, 200)
    t.same(fields(cancel.headers).policy, { ip: { q: 100, w: 60 }, session: { q: 3, w: 60 }, cancel: { q: 1, w: 30 } })
    t.same(fields(cancel.headers).limit.cancel, { r: 0, t: 30 })
    const secondCancel = await app.inject({ method: 'POST', url: '/cancel', headers: one.headers })
    t.equal(secondCancel.statusCode, 429)
    t.equal(secondCancel.json().code, 'RATE_LIMITED')
    // The cancel's window ends at 30 s, but this answer also says the session's is spent until
    // 60 s: a retry at 30 s would meet the session's 429 (draft-11, section 6).
    t.same(fields(secondCancel.headers).limit, { ip: { r: 96, t: 60 }, session: { r: 0, t: 60 }, cancel: { r: 0, t: 30 } })
    t.equal(secondCancel.headers['retry-after'], '60')
    t.equal((await app.inject({ method: 'POST', url: '/cancel', headers: two.headers })).statusCode, 200, 'another session has its own')
    const spent = await app.inject({ url: '/b', headers: one.headers })
    t.equal(spent.statusCode, 429, 'the session limit counts every route of the session')
    t.equal((await app.inject({ url: '/b' })).statusCode, 200, 'the same IP without that session is not refused')
    t.equal((await app.inject({ method: 'POST', url: '/cancel' })).statusCode, 200, 'no session: the route decides (401 in the app)')
  })

  t.test(`${store}: a cancel refused by the session limit is not counted as a cancel`, async (t) => {
    if (store === 'redis') await redis.flush()
    const app = await limitedApp(t, { ...(store === 'redis' ? { redisUrl: redis.url } : {}), env: { RATE_LIMIT_IP: '100/1m', RATE_LIMIT_SESSION: '2/1m', RATE_LIMIT_CANCEL: '5/1m' } })
    const one = await sessionHeaders(app)
    const cancel = { method: 'POST' as const, url: '/cancel', headers: one.headers }
    t.same(fields((await app.inject(cancel)).headers).limit.cancel, { r: 4, t: 60 })
    t.same(fields((await app.inject(cancel)).headers).limit.cancel, { r: 3, t: 60 })
    const refused = await app.inject(cancel)
    t.equal(refused.statusCode, 429)
    t.same(Object.keys(fields(refused.headers).policy), ['ip', 'session'], 'refused at the session limit: the cancel limit never applied')
    t.same(fields(refused.headers).limit.session, { r: 0, t: 60 })
    if (store === 'redis') {
      const client = app.sharedState.redis
      t.equal(await client?.get(`bff:limit:session:{${one.id}}`), '3')
      t.equal(await client?.get(`bff:limit:cancel:{${one.id}}`), '2', 'two cancels counted, not three')
    }
  })
}

t.test('memory: a wall clock stepped back (NTP) leaves Retry-After and RateLimit t= at the window', async (t) => {
  const wall = steppedWallClock(t)
  const app = await limitedApp(t, { env: { RATE_LIMIT_IP: '1/1m' } })
  t.equal((await app.inject({ url: '/a' })).statusCode, 200)
  wall.step(-3_600_000)
  const refused = await app.inject({ url: '/a' })
  t.equal(refused.statusCode, 429)
  t.equal(refused.headers['retry-after'], '60', 'not an hour longer')
  t.same(fields(refused.headers).limit, { ip: { r: 0, t: 60 } })
})

t.test('IPv6 clients are keyed by their /64', async (t) => {
  const app = await limitedApp(t, { env: { RATE_LIMIT_IP: '2/1m' } })
  t.equal((await app.inject({ url: '/a', remoteAddress: '2001:db8:1:2::1' })).statusCode, 200)
  t.equal((await app.inject({ url: '/a', remoteAddress: '2001:db8:1:2:ffff::9' })).statusCode, 200)
  t.equal((await app.inject({ url: '/a', remoteAddress: '2001:db8:1:2::7' })).statusCode, 429)
  t.equal((await app.inject({ url: '/a', remoteAddress: '2001:db8:1:3::1' })).statusCode, 200)
})

t.test('client addresses: IPv4 as it is, also IPv4-mapped; IPv6 by its /64; anything else as its text', async (t) => {
  t.equal(clientAddress('203.0.113.7'), '203.0.113.7')
  t.equal(clientAddress('::ffff:203.0.113.7'), '203.0.113.7')
  t.equal(clientAddress('2001:DB8:1:2:3:4:5:6'), '2001:db8:1:2::')
  t.equal(clientAddress('::1'), '::')
  t.equal(clientAddress('Not:An:Address'), 'not:an:address')
  // X-Forwarded-For entries with a port: the same client on every connection.
  t.equal(clientAddress('203.0.113.7:51234'), '203.0.113.7')
  t.equal(clientAddress('[2001:DB8:1:2:3:4:5:6]:51234'), '2001:db8:1:2::')
  t.equal(clientAddress('[2001:db8:1:2::9]'), '2001:db8:1:2::')
  t.equal(clientAddress('[::ffff:203.0.113.7]:80'), '203.0.113.7')
})

t.test('exact admission: three app instances sharing one Redis, 300 concurrent requests', async (t) => {
  await redis.flush()
  const apps = await Promise.all([1, 2, 3].map(async () => await limitedApp(t, { redisUrl: redis.url, env: { RATE_LIMIT_IP: '100/1m' } })))
  const answers = await Promise.all(Array.from({ length: 300 }, async (_, i) => await apps[i % 3]?.inject({ url: i % 2 === 0 ? '/a' : '/b', remoteAddress: '203.0.113.7' })))
  t.equal(answers.filter((answer) => answer?.statusCode === 200).length, 100, 'admitted == limit')
  t.equal(answers.filter((answer) => answer?.statusCode === 429).length, 200)
})

t.test('the app: every route and the not-found handler are limited per IP, sessions per session', async (t) => {
  const { app, issuer } = await buildTestApp(t, { env: { RATE_LIMIT_IP: '100/1m', RATE_LIMIT_SESSION: '2/1m' } })
  t.same(fields((await app.inject({ url: '/auth/me' })).headers).policy, { ip: { q: 100, w: 60 } })
  t.same(fields((await app.inject({ url: '/nowhere' })).headers).policy, { ip: { q: 100, w: 60 } })
  t.equal(typeof app.upstreamGate.acquire, 'function')
  const token = await signIn(app, issuer, 'limits@example.com')
  const me = { url: '/auth/me', headers: { authorization: `Bearer ${token}` } }
  const first = await app.inject(me)
  t.equal(first.statusCode, 200)
  t.same(fields(first.headers).limit.session, { r: 1, t: 60 })
  t.equal((await app.inject(me)).statusCode, 200)
  const refused = await app.inject(me)
  t.equal(refused.statusCode, 429)
  t.equal(refused.json().code, 'RATE_LIMITED')
  t.notMatch(JSON.stringify(refused.headers), token.slice(0, 16), 'no session token in any field')
})

for (const store of ['memory', 'redis'] as const) {
  t.test(`${store}: sign-out is never refused for a spent quota, the session's or its address's; only its own refusals count`, async (t) => {
    if (store === 'redis') await redis.flush()
    const { app, issuer } = await buildTestApp(t, { ...(store === 'redis' ? { redisUrl: redis.url } : {}), env: { RATE_LIMIT_IP: '4/1m', RATE_LIMIT_SESSION: '2/1m' } })
    const token = await signIn(app, issuer, 'signout@example.com')
    const bearer = { authorization: `Bearer ${token}` }
    const me = { url: '/auth/me', headers: bearer }
    t.equal((await app.inject(me)).statusCode, 200)
    t.equal((await app.inject(me)).statusCode, 200)
    t.equal((await app.inject(me)).statusCode, 429, 'the session spent its quota')
    t.equal((await app.inject({ url: '/auth/me' })).statusCode, 429, 'and its address spent its own')
    const logout = await app.inject({ method: 'POST', url: '/auth/logout', headers: bearer })
    t.equal(logout.statusCode, 200, 'the patient can still sign out')
    t.same(fields(logout.headers).policy, { ip: { q: 4, w: 60 } }, 'no session policy: it counts against none')
    t.same((await app.inject({ ...me, remoteAddress: '192.0.2.99' })).json().data, { authenticated: false }, 'and the session is over (asked from another address)')
    // Invalid tokens are refusals: an address sending them is stopped at the limit.
    const bogus = { method: 'POST' as const, url: '/auth/logout', headers: { authorization: 'Bearer not-a-session-token-at-all-xxxxxxxxxxxxx' } }
    const answers = []
    for (let i = 0; i < 5; i++) answers.push((await app.inject(bogus)).statusCode)
    t.same(answers, [401, 401, 401, 401, 429])
  })
}

t.test('the probes are neither counted nor refused: a liveness probe answered 429 would restart a healthy replica', async (t) => {
  const { app } = await buildTestApp(t, { env: { RATE_LIMIT_IP: '2/1m' } })
  for (let i = 0; i < 5; i++) {
    for (const url of ['/healthz', '/readyz', '/healthz?probe=1']) {
      const probe = await app.inject({ url })
      t.equal(probe.statusCode, 200, `${url} #${i + 1}`)
      t.equal(probe.headers.ratelimit, undefined)
    }
  }
  t.equal((await app.inject({ url: '/healthzz' })).statusCode, 404, 'only the probes themselves')
  t.equal((await app.inject({ url: '/auth/me' })).statusCode, 200, 'and they spent none of the address\'s requests')
  t.equal((await app.inject({ url: '/auth/me' })).statusCode, 429)
  t.equal((await app.inject({ method: 'HEAD', url: '/readyz' })).statusCode, 200, 'HEAD is a probe too, answered whatever the address spent')
  t.equal((await app.inject({ method: 'POST', url: '/healthz', payload: {} })).statusCode, 429, 'another method on their path is no probe: limited as any unknown route')
})

t.test('X-Forwarded-For counts only from a trusted proxy', async (t) => {
  const untrusting = await limitedApp(t, { env: { RATE_LIMIT_IP: '2/1m' } })
  const forged = async (app: typeof untrusting, n: number, remoteAddress: string) =>
    await app.inject({ url: '/a', remoteAddress, headers: { 'x-forwarded-for': `198.51.100.${n}` } })
  t.equal((await forged(untrusting, 1, '192.0.2.10')).statusCode, 200)
  t.equal((await forged(untrusting, 2, '192.0.2.10')).statusCode, 200)
  t.equal((await forged(untrusting, 3, '192.0.2.10')).statusCode, 429, 'without TRUST_PROXY a forged header changes nothing')

  const behindProxy = await limitedApp(t, { env: { RATE_LIMIT_IP: '2/1m', TRUST_PROXY: '10.0.0.0/8' } })
  for (let n = 1; n <= 4; n++) t.equal((await forged(behindProxy, n, '10.1.2.3')).statusCode, 200, 'the proxy names each client')
  t.equal((await forged(behindProxy, 1, '10.1.2.3')).statusCode, 200)
  t.equal((await forged(behindProxy, 1, '10.1.2.3')).statusCode, 429, 'the named client is limited')
  t.equal((await forged(behindProxy, 7, '192.0.2.10')).statusCode, 200)
  t.equal((await forged(behindProxy, 8, '192.0.2.10')).statusCode, 200)
  t.equal((await forged(behindProxy, 9, '192.0.2.10')).statusCode, 429, 'an untrusted peer is keyed by its own address')
})

t.test('REPLICAS above 1 without REDIS_URL: a warning at start', async (t) => {
  const lines: string[] = []
  await buildTestApp(t, { env: { REPLICAS: '3', CV_RATE_LIMIT: '10/1m' }, logStream: { write: (line: string) => { lines.push(line) } } })
  const warnings = lines.map((line) => JSON.parse(line) as { level: number, msg: string, replicas?: number }).filter((line) => line.level === 40 && line.msg.startsWith('REPLICAS above 1 without REDIS_URL'))
  t.equal(warnings.length, 1)
  t.equal(warnings[0]?.replicas, 3)
  const quiet: string[] = []
  await buildTestApp(t, { env: { REPLICAS: '3' }, redis: await startRedis(t), logStream: { write: (line: string) => { quiet.push(line) } } })
  t.notOk(quiet.some((line) => line.includes('REPLICAS above 1')), 'with Redis: its meaning, no warning')
})

t.test('X-Forwarded-For: a trusted hop written with its port is still a trusted hop (Azure Application Gateway behind Front Door or another proxy)', async (t) => {
  // Application Gateway writes every entry it appends as IP:port. Behind another trusted proxy, the
  // entry it appends is that proxy's own address with a port: `client, proxy:port`. The README says
  // a port in X-Forwarded-For is ignored; here it makes the trusted hop the client, and every
  // patient behind that hop shares its one counter.
  const app = await limitedApp(t, { env: { RATE_LIMIT_IP: '2/1m', TRUST_PROXY: '10.0.0.0/8' } })
  const via = async (client: string, port: number) =>
    await app.inject({ url: '/a', remoteAddress: '10.1.2.3', headers: { 'x-forwarded-for': `${client}:${port}, 10.9.9.9:${40000 + port}` } })
  t.equal((await via('203.0.113.7', 1)).statusCode, 200)
  t.equal((await via('198.51.100.8', 2)).statusCode, 200)
  const third = await via('192.0.2.44', 3)
  t.equal(third.statusCode, 200, 'a third client is not refused for the first two\'s requests')
  t.match(String(third.headers.ratelimit), /"ip";r=1;/, 'its own counter: one request of two spent')

  // An IPv6 hop with its port, bracketed.
  const v6 = await limitedApp(t, { env: { RATE_LIMIT_IP: '2/1m', TRUST_PROXY: 'fd00::/8' } })
  const viaV6 = async (client: string, port: number) =>
    await v6.inject({ url: '/a', remoteAddress: 'fd00::1', headers: { 'x-forwarded-for': `${client}, [fd00::9]:${40000 + port}` } })
  t.equal((await viaV6('203.0.113.7', 1)).statusCode, 200)
  t.equal((await viaV6('198.51.100.8', 2)).statusCode, 200)
  const thirdV6 = await viaV6('192.0.2.44', 3)
  t.equal(thirdV6.statusCode, 200, 'behind an IPv6 hop with its port too')
  t.match(String(thirdV6.headers.ratelimit), /"ip";r=1;/)
})

t.test('client addresses: an IPv4-mapped address in any IPv6 spelling is its IPv4 address, not the ::/64 every such client shares', async (t) => {
  // A proxy may write the mapped form otherwise than Node's socket does (upper case, fully
  // expanded, the IPv4 part in hex). Each spelling is one IPv4 client; the /64 fallback makes them
  // all `::`, one counter with every other client so written (and with ::1).
  t.equal(clientAddress('::FFFF:203.0.113.7'), '203.0.113.7')
  t.equal(clientAddress('0:0:0:0:0:ffff:203.0.113.7'), '203.0.113.7')
  t.equal(clientAddress('::ffff:cb00:7107'), '203.0.113.7')
  t.not(clientAddress('::ffff:cb00:7107'), clientAddress('::ffff:c633:6408'), 'two IPv4 clients, two keys')
})

t.test('a refusals-only route counts its 4xx answers only: its 5xx (a store down) are not the address\'s refusals', async (t) => {
  const app = await limitedApp(t, {
    env: { RATE_LIMIT_IP: '2/1m' },
    routes: (app) => {
      app.post('/refusals-only', { config: { ipLimit: 'refusals' } }, async function answerAsAsked (request, reply) {
        return await reply.code(Number((request.query as { status: string }).status)).send({ asked: true })
      })
    }
  })
  const post = async (status: number) => (await app.inject({ method: 'POST', url: `/refusals-only?status=${status}` })).statusCode
  const serverErrors = []
  for (const status of [503, 500, 503, 200]) serverErrors.push(await post(status))
  t.same(serverErrors, [503, 500, 503, 200], 'server errors count as no refusal')
  const refusals = []
  for (const status of [400, 401, 200]) refusals.push(await post(status))
  t.same(refusals, [400, 401, 429], 'two 4xx reach the limit of two')
})

t.test('an address with a port is only that: anything after the port is no address to strip it from', async (t) => {
  t.equal(clientAddress('203.0.113.7:80:81'), '203.0.113.7:80:81', 'text after the port: the whole entry is the key')
  t.equal(clientAddress('203.0.113.7:51234x'), '203.0.113.7:51234x')
  const trusted = proxyTrust(['10.0.0.0/8'])
  t.not(trusted, false)
  if (trusted === false) return
  t.equal(trusted('10.1.2.3:443', 0), true, 'a trusted hop with its port')
  t.equal(trusted('10.1.2.3:443x', 0), false, 'a hop with junk after its port is not that proxy')
})

t.test('one replica without Redis is the in-memory mode itself: no REPLICAS warning', async (t) => {
  const lines: string[] = []
  await buildTestApp(t, { env: { REPLICAS: '1' }, logStream: { write: (line: string) => { lines.push(line) } } })
  t.notOk(lines.some((line) => line.includes('REPLICAS above 1')))
})

t.test('Retry-After: whole seconds rounded up, never 0 (a client told 0 would retry at once)', async (t) => {
  t.equal(retryAfterSeconds(0), '1')
  t.equal(retryAfterSeconds(1), '1')
  t.equal(retryAfterSeconds(1000), '1')
  t.equal(retryAfterSeconds(1001), '2')
})
