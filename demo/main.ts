import process from 'node:process'
import { DEFAULT_PORTS, PORT_VARIABLES, type DemoPorts } from './ports.js'

/**
 * `npm run demo`: the whole service on loopback with a sandbox and a development IdP. The only
 * demo module that touches the process (environment, signals, exit).
 */

function fail (message: string): never {
  process.stderr.write(`${message}\n`)
  process.exit(1)
}

// The demo signs anyone in with one click and points at a fake upstream: never in production.
if (process.env.NODE_ENV === 'production') {
  fail('npm run demo refuses to run with NODE_ENV=production: it starts a development identity provider without passwords. Use npm start with a real configuration.')
}

// The environment is judged before the stack (oidc-provider, the service) is even loaded.
function portsFromEnv (): DemoPorts {
  const ports = { ...DEFAULT_PORTS }
  for (const part of Object.keys(PORT_VARIABLES) as Array<keyof DemoPorts>) {
    const variable = PORT_VARIABLES[part]
    const text = process.env[variable]
    if (text === undefined || text === '') continue
    const port = Number(text)
    // 0 picks a free port (the printed addresses show which).
    if (!/^[0-9]{1,5}$/.test(text) || port > 65535) fail(`${variable} must be a port number from 0 to 65535`)
    ports[part] = port
  }
  return ports
}

const ports = portsFromEnv()
const { DemoPortInUseError, startDemo } = await import('./stack.js')
const { walkthrough } = await import('./walkthrough.js')
let demo
try {
  demo = await startDemo({ ports, logLevel: process.env.DEMO_LOG_LEVEL ?? 'warn' })
} catch (error) {
  if (error instanceof DemoPortInUseError) fail(error.message)
  throw error
}
const running = demo

let stopping = false
async function stop (signal: string): Promise<void> {
  if (stopping) {
    // A second Ctrl-C: the user does not want to wait.
    process.exit(130)
  }
  stopping = true
  process.stdout.write(`\n${signal}: stopping the demo...\n`)
  const deadline = setTimeout(() => {
    process.stderr.write('the demo did not stop within 5 s; exiting\n')
    process.exit(1)
  }, 5000)
  deadline.unref()
  await running.close()
  process.exit(0)
}
function crash (error: unknown): never {
  process.stderr.write(`the demo failed to stop: ${String(error)}\n`)
  process.exit(1)
}
process.on('SIGINT', function onInterrupt () { stop('SIGINT').catch(crash) })
process.on('SIGTERM', function onTerminate () { stop('SIGTERM').catch(crash) })

process.stdout.write(walkthrough(running))
