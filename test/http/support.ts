import { connect } from 'node:net'
import type { Test } from 'tap'
import { DEMO_PATIENTS } from '../../src/care360/sandbox.js'
import { listen, startSandboxedApp } from '../fault/support.js'

const alice = DEMO_PATIENTS[0]!

/**
 * The app on a real port, over the sandbox, with alice signed in: the port, the sandbox (its
 * calls), her bearer token, one of her appointments and a cancel body, for raw requests.
 */
export async function cancelOnSocket (t: Test): Promise<{ app: Awaited<ReturnType<typeof startSandboxedApp>>['app'], port: number, sandbox: Awaited<ReturnType<typeof startSandboxedApp>>['sandbox'], token: string, id: string, body: string }> {
  const { app, sandbox, token } = await startSandboxedApp(t, { upstreamTimeoutMs: 2000, email: alice.email })
  const port = Number(new URL(await listen(app)).port)
  return { app, port, sandbox, token, id: alice.appointments[0]!.id, body: '{"reason":"Feeling better"}' }
}

/**
 * Sends `text` on a fresh loopback connection and gives back everything the server wrote, once it
 * closes the connection or has been silent for `idleMs` (then `closed` is false).
 */
export function exchange (port: number, text: string | Buffer, idleMs = 1500): Promise<{ received: string, closed: boolean }> {
  return new Promise((resolve) => {
    const socket = connect(port, '127.0.0.1')
    const chunks: Buffer[] = []
    let timer: NodeJS.Timeout | undefined
    const finish = (closed: boolean): void => {
      clearTimeout(timer)
      socket.destroy()
      resolve({ received: Buffer.concat(chunks).toString('latin1'), closed })
    }
    const arm = (): void => {
      clearTimeout(timer)
      timer = setTimeout(() => { finish(false) }, idleMs)
    }
    socket.on('data', (chunk: Buffer) => { chunks.push(chunk); arm() })
    socket.on('end', () => { finish(true) })
    socket.on('error', () => { finish(true) })
    socket.on('connect', () => { socket.write(text); arm() })
  })
}

/** The status codes of the answers in what a connection received, in order. */
export function statuses (received: string): number[] {
  return [...received.matchAll(/HTTP\/1\.1 (\d{3}) /g)].map((match) => Number(match[1]))
}
