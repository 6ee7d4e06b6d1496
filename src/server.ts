// First: SIGTERM and SIGINT are handled from the start (the image runs this as PID 1).
import { startingDone } from './early-signals.js'
import type { Server } from 'node:net'
import closeWithGrace from 'close-with-grace'
import pino from 'pino'
import { buildApp, shutDown, shutdownDeadlineFor } from './app.js'
import { ConfigError, loadConfig, unknownVariables, type Config } from './config.js'
import { listenAddress, listenRefusal } from './listener.js'
import { buildMetricsServer } from './metrics.js'

/**
 * The only module that touches the process: environment, signals, listening and exit.
 */

/**
 * Log lines to stdout in batches: written once 4 KiB have gathered or every second, whichever
 * comes first, and the rest flushed at exit (main registers that: pino flushes only asynchronous
 * destinations at exit). A write per line cost a tenth of a cancel's CPU; a second's delay costs
 * an operator nothing. Only a SIGKILL can lose lines, at most one batch.
 *
 * The batch is written synchronously, as pino and Fastify write by default: one write(2) per
 * batch on this thread. An asynchronous write goes through libuv's thread pool, whose hand-offs
 * cost more than the write: writing synchronously took 6% off a cancel's CPU (12 rounds side by
 * side, bench/run.ts --compare with BENCH_VARIANTS). If the reader of stdout stalls, a full pipe
 * makes sonic-boom retry, blocking the event loop, rather than letting unwritten logs pile up in
 * memory.
 */
function logDestination (): ReturnType<typeof pino.destination> {
  const destination = pino.destination({ dest: 1, sync: true, minLength: 4096, periodicFlush: 1000 })
  // The last batch: the access lines of the requests that finished during a drain, the line of a
  // fatal error. A synchronous destination's flush() writes at once. Not flushSync(): on a broken
  // stdout it retries forever (sonic-boom 4.2 retries every write error in it, not only EAGAIN),
  // which would hang the exit; a write through flush() that fails with EPIPE is dropped instead
  // (pino's handler of the destination's errors).
  process.once('exit', function flushLogs () { destination.flush() })
  return destination
}

async function main (): Promise<void> {
  let config: Config
  try {
    config = loadConfig(process.env)
  } catch (error) {
    if (error instanceof ConfigError) {
      process.stderr.write(`${error.message}\n`)
      process.exit(1)
    }
    throw error
  }

  const app = await buildApp(config, { logStream: logDestination() })
  // A near miss of a variable's name changes nothing (the default stands in): said, never its value.
  for (const [variable, meant] of unknownVariables(process.env)) {
    app.log.warn({ variable, meant }, `${variable} is not a variable this service reads (${meant}?): ignored`)
  }
  if (config.keyRoot.fromApiKey) {
    app.log.warn('SERVICE_SECRET is not set: patient hashes (log lines, Idempotency-Key records) derive from the organization key, and rotating that key re-keys them')
  }
  // Prometheus on its own port, never the public one; METRICS_PORT=0 turns it off.
  const metricsServer = config.metricsPort === 0 ? null : buildMetricsServer(app.metrics.registry)

  // On SIGTERM/SIGINT: unready for SHUTDOWN_DELAY when set (still serving, app.ts shutDown), then
  // stop accepting (new connections are refused, which a load balancer retries elsewhere), let
  // in-flight requests finish and close their connections (app.ts, drainOnClose), then close the
  // upstream pool and Redis (their onClose hooks). A client still sending its headers gets a 408
  // after headersTimeout (drainOnClose). Past the deadline, close-with-grace exits 1: a request
  // still unanswered, or one whose body is still arriving (Node stops enforcing requestTimeout
  // once the server closes; the deadline is that bound). After an uncaught error: no delay.
  const deadline = config.shutdownDelayMs + shutdownDeadlineFor(config.care360.timeoutMs)
  startingDone()
  closeWithGrace({ delay: deadline, logger: app.log }, async function shutdown ({ signal, err }) {
    if (err !== undefined) app.log.error({ err }, 'shutting down after an error')
    else app.log.info({ signal }, 'shutting down')
    await shutDown(app, err === undefined ? config.shutdownDelayMs : 0)
    // Last, so that the drain itself can still be watched.
    await metricsServer?.close()
  })

  await listenOrRefuse(async () => await app.listen({ host: await listenAddress(config.host), port: config.port }), 'PORT', config.host, config.port)
  if (metricsServer !== null) {
    await listenOrRefuse(async () => await metricsServer.listen({ host: await listenAddress(config.host), port: config.metricsPort }), 'METRICS_PORT', config.host, config.metricsPort)
  }
  // One line an operator can read the start from: where it listens, and on which state (the
  // configured mode: a Redis unreachable at start has its own warning). No URL of Redis (it may
  // hold a password), no key.
  const sharedState = config.redisUrl === null ? 'memory' : 'redis'
  app.log.info({
    address: urlOf(app.server.address()),
    metrics: metricsServer === null ? null : urlOf(metricsServer.server.address()),
    sharedState,
    replicas: config.replicas
  }, `started: ${sharedState === 'memory' ? 'in-memory state (one process)' : 'shared state in Redis'}`)
}

function urlOf (address: ReturnType<Server['address']>): string | null {
  if (address === null || typeof address === 'string') return address
  return `http://${address.family === 'IPv6' ? `[${address.address}]` : address.address}:${address.port}`
}

/**
 * A listener that cannot listen for a reason the operator mends in the configuration (a port in
 * use, an address this machine does not have) stops start-up as a bad value does: one message on
 * stderr naming the variable, exit 1 (the metrics listener's failure ends a public listener that
 * has listened for an instant).
 */
async function listenOrRefuse (listen: () => Promise<unknown>, portVariable: 'PORT' | 'METRICS_PORT', host: string, port: number): Promise<void> {
  try {
    await listen()
  } catch (error) {
    const refusal = listenRefusal(error, portVariable, host, port)
    if (refusal === null) throw error
    process.stderr.write(`${refusal}\n`)
    process.exit(1)
  }
}

await main()
