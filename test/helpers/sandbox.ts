import type { FastifyInstance } from 'fastify'
import { buildSandbox, type SandboxControl, type SandboxOptions } from '../../src/care360/sandbox.js'

interface TeardownHost { teardown: (fn: () => unknown) => void }

export const SANDBOX_KEY = 'test-sandbox-key'

export interface RunningSandbox {
  /** Origin of the listening sandbox, e.g. http://127.0.0.1:12345 */
  url: string
  control: SandboxControl
  app: FastifyInstance
  close: () => Promise<void>
}

/** A Care360 sandbox on a real loopback port, closed when the test ends. */
export async function startSandbox (t: TeardownHost, options: Partial<SandboxOptions> = {}): Promise<RunningSandbox> {
  const { app, control } = await buildSandbox({ apiKey: SANDBOX_KEY, ...options })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const address = app.server.address()
  if (address === null || typeof address === 'string') throw new Error('sandbox did not listen on a port')
  let closed = false
  async function close (): Promise<void> {
    if (closed) return
    closed = true
    await app.close()
  }
  t.teardown(close)
  return { url: `http://127.0.0.1:${address.port}`, control, app, close }
}
