import t from 'tap'
import Fastify from 'fastify'
import { request } from 'node:http'
import type { AddressInfo } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import { afterEveryAnswer } from '../../src/plugins/after-answer.js'

// Kills the mutant `settled.then(next, next)` -> `settled.then(next)` (src/plugins/after-answer.ts:52):
// a route's async onResponse hook that rejects, for a client that left, must neither stop the
// after-answer hook (the audit record, the access line) nor leave an unhandled rejection behind.
t.test('a client that left: an async onResponse hook that rejects does not stop the after-answer hook', async (t) => {
  const unhandled: unknown[] = []
  const onUnhandled = (reason: unknown): void => { unhandled.push(reason) }
  process.on('unhandledRejection', onUnhandled)
  t.teardown(() => { process.off('unhandledRejection', onUnhandled) })

  const app = Fastify()
  t.teardown(() => app.close())
  const ran: string[] = []
  afterEveryAnswer(app, (route) => function after (_request, reply, done) {
    ran.push(`after ${route ?? 'none'} ${reply.statusCode}`)
    done()
  })
  app.get('/slow', {
    onResponse: [async function own () { ran.push('own async'); throw new Error('hook failed') }]
  }, async (_request, reply) => {
    await sleep(150)
    return await reply.code(202).send({ ok: true })
  })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const port = (app.server.address() as AddressInfo).port

  const left = request({ host: '127.0.0.1', port, path: '/slow' })
  left.on('error', () => {})
  left.end()
  await sleep(50)
  left.destroy()
  await sleep(300)
  t.same(ran, ['own async', 'after /slow 202'], 'the after-answer hook still runs')
  t.same(unhandled, [], 'no unhandled rejection')
})
