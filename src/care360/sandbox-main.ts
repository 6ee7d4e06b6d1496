import process from 'node:process'
import { buildSandbox, sandboxEnv } from './sandbox.js'

/** Runs the Care360 sandbox by hand on 127.0.0.1 (settings: see sandboxEnv). */

const { port, options } = sandboxEnv(process.env)
const { app } = await buildSandbox(options)

async function shutdown (): Promise<void> {
  await app.close()
  process.exit(0)
}
process.once('SIGINT', shutdown)
process.once('SIGTERM', shutdown)

await app.listen({ host: '127.0.0.1', port })
