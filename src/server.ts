import closeWithGrace from 'close-with-grace'
import { buildApp } from './app.js'
import { ConfigError, loadConfig, type Config } from './config.js'
import { buildMetricsServer } from './metrics.js'

/**
 * The only module that touches the process: environment, signals, listening and exit.
 */

const SHUTDOWN_DEADLINE_MS = 10_000

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

  const app = await buildApp(config)
  // Prometheus on its own port, never the public one; METRICS_PORT=0 turns it off.
  const metricsServer = config.metricsPort === 0 ? null : buildMetricsServer(app.metrics.registry)

  // On SIGTERM/SIGINT: report not-ready at once, stop accepting, let in-flight requests finish
  // within the deadline, then close the upstream pool and Redis (their onClose hooks).
  closeWithGrace({ delay: SHUTDOWN_DEADLINE_MS, logger: app.log }, async function shutdown ({ signal, err }) {
    if (err !== undefined) app.log.error({ err }, 'shutting down after an error')
    else app.log.info({ signal }, 'shutting down')
    app.draining = true
    await app.close()
    // Last, so that the drain itself can still be watched.
    await metricsServer?.close()
  })

  await app.listen({ host: config.host, port: config.port })
  await metricsServer?.listen({ host: config.host, port: config.metricsPort })
}

await main()
