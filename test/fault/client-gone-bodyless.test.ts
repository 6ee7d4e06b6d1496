import t from 'tap'
import { connect } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import { DEMO_PATIENTS } from '../../src/care360/sandbox.js'
import { captureLogs, listen, startSandboxedApp } from './support.js'
import { redisClient, startRedis } from '../helpers/redis.js'

/**
 * A request without a body (a logout; a cancel, whose body is optional) whose client left while
 * its hooks waited for Redis: Node destroyed the request, but there is no body to lose, so it runs
 * to its end as any request whose client left does (client-gone.test.ts): the session ends, the
 * cancel goes. Only a request with a body to read fails as a body cut off (parser-refused-body).
 */

const alice = DEMO_PATIENTS[0]!

interface AccessLine { msg: string, reqId?: string, res?: { statusCode?: number }, code?: string, audit?: { outcome?: string } }

/** Writes `head` on a raw connection and ends the client's side at once; resolves once the connection is closed (at most 3 s). */
async function sendAndLeave (port: number, head: string): Promise<void> {
  await new Promise<void>((resolve) => {
    const socket = connect(port, '127.0.0.1')
    const finish = (): void => { clearTimeout(giveUp); socket.destroy(); resolve() }
    const giveUp = setTimeout(finish, 3000)
    socket.on('error', () => {})
    socket.on('close', finish)
    socket.on('connect', () => { socket.end(head) })
  })
}

t.test('a body-less POST whose client left while its hooks waited for Redis is served all the same', async (t) => {
  const { lines, stream } = captureLogs()
  const redis = await startRedis(t)
  const { app, sandbox, token } = await startSandboxedApp(t, { upstreamTimeoutMs: 2000, email: alice.email, logStream: stream, redis })
  const port = Number(new URL(await listen(app)).port)
  const admin = redisClient(redis.url)
  t.teardown(() => { admin.disconnect() })
  /** The request's access line, once written (at most 3 s). */
  const accessLine = async (requestId: string): Promise<AccessLine | undefined> => {
    const find = (): AccessLine | undefined => lines.map((line) => JSON.parse(line) as AccessLine).find((line) => line.msg === 'request completed' && line.reqId === requestId)
    const by = Date.now() + 3000
    while (find() === undefined && Date.now() < by) await sleep(20)
    return find()
  }
  const head = (path: string, requestId: string, headers: string): string =>
    `POST ${path} HTTP/1.1\r\nhost: x\r\nx-request-id: ${requestId}\r\nauthorization: Bearer ${token}\r\n${headers}\r\n`

  const cancels: Array<[string, string, string]> = [
    ['Content-Length: 0, no type', alice.appointments[0]!.id, 'content-length: 0\r\n'],
    ['Content-Length: 0, JSON', alice.appointments[1]!.id, 'content-type: application/json\r\ncontent-length: 0\r\n']
  ]
  for (const [what, id, headers] of cancels) {
    const requestId = `bodyless-cancel-${id}`
    // Under Redis's command timeout (250 ms): the session lookup waits, then succeeds.
    await admin.call('CLIENT', 'PAUSE', '150', 'ALL')
    await sendAndLeave(port, head(`/appointments/${id}/cancel`, requestId, headers))
    t.match(await accessLine(requestId), { res: { statusCode: 200 }, audit: { outcome: 'cancelled' } }, `a cancel without a body (${what}): run to its end`)
    t.ok(sandbox.control.isCancelled(id), `${what}: the cancel went`)
  }

  await admin.call('CLIENT', 'PAUSE', '150', 'ALL')
  await sendAndLeave(port, head('/auth/logout', 'bodyless-logout', ''))
  t.match(await accessLine('bodyless-logout'), { res: { statusCode: 200 } }, 'a logout without a body: run to its end')
  const me = await app.inject({ url: '/auth/me', headers: { authorization: `Bearer ${token}` } })
  t.same(me.json().data, { authenticated: false }, 'the session ended')
})
