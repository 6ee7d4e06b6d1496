import t, { type Test } from 'tap'
import Fastify, { type FastifyInstance, type onResponseHookHandler } from 'fastify'
import { once } from 'node:events'
import { request } from 'node:http'
import type { AddressInfo } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import { afterEveryAnswer } from '../../src/plugins/after-answer.js'

/**
 * An app whose after-answer hook notes each answer in `ran`, with a /slow route (202 after
 * 150 ms) that has `own` as its onResponse hook, listening on loopback.
 */
async function appWithSlowRoute (t: Test, own: onResponseHookHandler, ran: string[]): Promise<{ app: FastifyInstance, port: number }> {
  const app = Fastify()
  t.teardown(() => app.close())
  const after = (route: string): onResponseHookHandler => function after (_request, reply, done) {
    ran.push(`after ${route} ${reply.statusCode}`)
    done()
  }
  afterEveryAnswer(app, after, after('none'))
  app.get('/slow', { onResponse: [own] }, async (_request, reply) => {
    await sleep(150)
    return await reply.code(202).send({ ok: true })
  })
  app.get('/fast', async () => ({ ok: true }))
  await app.listen({ host: '127.0.0.1', port: 0 })
  return { app, port: (app.server.address() as AddressInfo).port }
}

/**
 * A client that asks for /slow and leaves once the server has its request, before the answer;
 * resolves once two hooks have run (bounded) and a little longer, so that a hook run twice would
 * show. Waiting for the request, not a fixed time: on a busy machine the client could leave before
 * its request arrived, and then no hook runs at all.
 */
async function leaveMidRequest (app: FastifyInstance, ran: string[]): Promise<void> {
  const { port } = app.server.address() as AddressInfo
  const arrived = once(app.server, 'request')
  const left = request({ host: '127.0.0.1', port, path: '/slow' })
  left.on('error', () => {})
  left.end()
  await Promise.race([arrived, sleep(3000)])
  left.destroy()
  const bothRan = (): boolean => ran.length >= 2
  for (let i = 0; i < 300 && !bothRan(); i++) await sleep(10)
  await sleep(100)
}

t.test('a client that left: the route\'s onResponse hooks run in order from onSend, callback or async, once', async (t) => {
  const ran: string[] = []
  const { app, port } = await appWithSlowRoute(t, async function own () { await sleep(5); ran.push('own async') }, ran)
  await leaveMidRequest(app, ran)
  t.same(ran, ['own async', 'after /slow 202'], 'both hooks, in order, for the client that left')

  ran.length = 0
  const answered = await fetch(`http://127.0.0.1:${port}/fast`)
  await answered.text()
  await sleep(50)
  t.same(ran, ['after /fast 200'], 'an answered request runs them once, the usual way')
})

// Kills dropping `if (!reply.raw.writableFinished)` (after-answer.ts): an answer that was sent in
// full, on a connection that then closed (Connection: close) while a route's own async onResponse
// hook still ran, was answered, not left: its hooks run once, the usual way, not again on close.
t.test('an answer sent in full before its connection closed runs its hooks once, however slow they are', async (t) => {
  const ran: string[] = []
  const { port } = await appWithSlowRoute(t, async function own () { await sleep(100); ran.push('own async') }, ran)
  const answered = await fetch(`http://127.0.0.1:${port}/slow`, { headers: { connection: 'close' } })
  t.equal(answered.status, 202)
  await answered.text()
  await sleep(300)
  t.same(ran, ['own async', 'after /slow 202'], 'once each')
})

// A route's async onResponse hook that rejects, for a client that left, must neither stop the
// after-answer hook (the audit record, the access line) nor leave an unhandled rejection behind.
t.test('a client that left: an async onResponse hook that rejects does not stop the after-answer hook', async (t) => {
  const unhandled: unknown[] = []
  const onUnhandled = (reason: unknown): void => { unhandled.push(reason) }
  process.on('unhandledRejection', onUnhandled)
  t.teardown(() => { process.off('unhandledRejection', onUnhandled) })
  const ran: string[] = []
  const { app } = await appWithSlowRoute(t, async function own () { ran.push('own async'); throw new Error('hook failed') }, ran)
  await leaveMidRequest(app, ran)
  t.same(ran, ['own async', 'after /slow 202'], 'the after-answer hook still runs')
  t.same(unhandled, [], 'no unhandled rejection')
})

t.test('the hook for requests no route matched runs only for them, and none is added when it is null', async (t) => {
  const app = Fastify()
  t.teardown(() => app.close())
  const ran: string[] = []
  const after = (route: string): onResponseHookHandler => function after (_request, reply, done) {
    ran.push(`${route} ${reply.statusCode}`)
    done()
  }
  afterEveryAnswer(app, after, after('none'))
  afterEveryAnswer(app, (route) => after(`second ${route}`), null)
  app.get('/here', async () => ({ ok: true }))

  await app.inject({ url: '/here' })
  await app.inject({ url: '/nowhere' })
  t.same(ran, ['/here 200', 'second /here 200', 'none 404'], 'the routed request ran both route hooks; the unrouted one only the first not-found hook')
})
