import t from 'tap'
import Fastify from 'fastify'
import { request } from 'node:http'
import type { AddressInfo } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import { afterEveryAnswer } from '../../src/plugins/after-answer.js'

t.test('a client that left: the route\'s onResponse hooks run in order from onSend, callback or async, once', async (t) => {
  const app = Fastify()
  t.teardown(() => app.close())
  const ran: string[] = []
  afterEveryAnswer(app, (route) => function after (_request, reply, done) {
    ran.push(`after ${route ?? 'none'} ${reply.statusCode}`)
    done()
  })
  app.get('/slow', {
    onResponse: [async function own () { await sleep(5); ran.push('own async') }]
  }, async (_request, reply) => {
    await sleep(150)
    return await reply.code(202).send({ ok: true })
  })
  app.get('/fast', async () => ({ ok: true }))
  await app.listen({ host: '127.0.0.1', port: 0 })
  const port = (app.server.address() as AddressInfo).port

  const left = request({ host: '127.0.0.1', port, path: '/slow' })
  left.on('error', () => {})
  left.end()
  await sleep(50)
  left.destroy()
  await sleep(300)
  t.same(ran, ['own async', 'after /slow 202'], 'both hooks, in order, for the client that left')

  ran.length = 0
  const answered = await fetch(`http://127.0.0.1:${port}/fast`)
  await answered.text()
  await sleep(50)
  t.same(ran, ['after /fast 200'], 'an answered request runs them once, the usual way')
})
