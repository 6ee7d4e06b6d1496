import { readFile } from 'node:fs/promises'
import t from 'tap'
// yaml: a dependency of @fastify/swagger (a production dependency), so always installed.
import { parse } from 'yaml'
import { loadConfig, parseDuration } from '../../src/config.js'
import { shutdownDeadlineFor } from '../../src/app.js'

/**
 * docker-compose.yml cannot run here (no Docker engine), so its wiring is checked as data: every
 * replica's environment is a configuration the service accepts, the replicas agree with each other
 * and with the dev tools, and the start order follows health.
 */

interface Service {
  build?: { target?: string }
  image?: string
  network_mode?: string
  ports?: string[]
  environment?: Record<string, string>
  depends_on?: Record<string, { condition: string }>
  healthcheck?: { test: string[] }
  stop_grace_period?: string
}

const compose = parse(await readFile('docker-compose.yml', 'utf8'), { merge: true }) as { services: Record<string, Service> }
const services = compose.services
const replicas = Object.entries(services).filter(([, service]) => service.build?.target === 'runtime')

t.test('two replicas of the runtime image, each with a configuration the service accepts', async (t) => {
  t.equal(replicas.length, 2, 'two replicas')
  const ports = new Set<number>()
  const metrics = new Set<number>()
  for (const [name, service] of replicas) {
    const env = service.environment ?? {}
    const config = loadConfig(env)
    t.equal(config.redisUrl, 'redis://redis:6379', `${name} shares the Redis`)
    t.equal(config.replicas, 2, `${name} knows there are two replicas`)
    t.ok(config.oidc.web, `${name} has web sign-in`)
    t.same(config.trustProxy, ['127.0.0.1'], `${name} trusts the load balancer only`)
    ports.add(config.port)
    metrics.add(config.metricsPort)
    t.equal(env.NODE_ENV, 'production')
    t.same(service.depends_on, { 'dev-tools': { condition: 'service_healthy' }, redis: { condition: 'service_healthy' } }, `${name} starts after healthy dependencies`)
    t.equal(service.network_mode, 'service:dev-tools', `${name} meets the dev tools on loopback`)
  }
  t.equal(ports.size, 2, 'distinct ports in the shared namespace')
  t.equal(metrics.size, 2, 'distinct metrics ports in the shared namespace')
  const [first, second] = replicas.map(([, service]) => {
    const { PORT: _port, METRICS_PORT: _metrics, ...rest } = service.environment ?? {}
    return rest
  })
  t.same(first, second, 'otherwise identical replicas')
})

t.test('the dev tools and the load balancer match the replicas', async (t) => {
  const tools = services['dev-tools'] as Service
  const replica = replicas[0]?.[1].environment ?? {}
  t.equal(tools.build?.target, 'dev-tools')
  t.equal(tools.environment?.SANDBOX_API_KEY, replica.CV_API_KEY, 'the sandbox takes the replicas\' key')
  t.equal(tools.environment?.OIDC_CLIENT_SECRET, replica.OIDC_CLIENT_SECRET, 'the IdP knows the web client')
  t.equal(tools.environment?.OIDC_CLIENT_ID, replica.OIDC_CLIENT_ID)
  t.equal(tools.environment?.PUBLIC_URL, replica.PUBLIC_URL)
  // The IdP registers the web app's URL as the post-logout redirect URI the replicas send
  // (compose-tools.ts passes it to startDevIdp; its default there is the demo page's).
  t.equal(tools.environment?.WEB_APP_URL ?? 'http://localhost:5173', replica.WEB_APP_URL, 'the IdP and the replicas agree on the web app')
  t.ok(tools.healthcheck, 'the dev tools have a healthcheck')
  for (const port of ['3000', '4000', '4010', '5173']) {
    t.ok(tools.ports?.some((mapping) => mapping.endsWith(`:${port}:${port}`)), `port ${port} published`)
  }
  t.ok(tools.ports?.every((mapping) => mapping.startsWith('127.0.0.1:')), 'published on the host\'s loopback only')

  const balancer = services['load-balancer'] as Service
  t.equal(balancer.network_mode, 'service:dev-tools')
  t.same(Object.keys(balancer.depends_on ?? {}).sort(), replicas.map(([name]) => name).sort(), 'starts after the replicas')
  t.ok(Object.values(balancer.depends_on ?? {}).every((dependency) => dependency.condition === 'service_healthy'))
  const nginx = await readFile('demo/compose/nginx.conf', 'utf8')
  for (const [, service] of replicas) t.match(nginx, `server 127.0.0.1:${service.environment?.PORT}`, 'balances over each replica')
  t.ok(services.redis?.healthcheck, 'Redis has a healthcheck')
  // Its state outlives a restart (appendonly on a volume), and is never evicted.
  const redisCommand = (services.redis as { command?: string[] }).command ?? []
  t.match(redisCommand.join(' '), /--appendonly yes/)
  t.match(redisCommand.join(' '), /--maxmemory-policy noeviction/)
  t.equal((services.redis as { restart?: string }).restart, 'unless-stopped')
  t.same((services.redis as { volumes?: string[] }).volumes, ['redis-data:/data'])
})

t.test('the Dockerfile keeps the runtime stage last, with the dev tools before it', async (t) => {
  const dockerfile = await readFile('Dockerfile', 'utf8')
  const stages = [...dockerfile.matchAll(/^FROM \S+ AS (\S+)$/gm)].map((match) => match[1])
  t.same(stages, ['build', 'dev-tools', 'runtime'])
  // npm start's command (package.json), Node options included, as an exec-form CMD: node is PID 1.
  const start = JSON.parse(await readFile('package.json', 'utf8')).scripts.start as string
  t.match(start, /^node (--\S+ )*dist\/server\.js$/, 'npm start runs the bundle with node')
  t.ok(dockerfile.trimEnd().endsWith(`CMD ${JSON.stringify(start.split(' ')).replaceAll(',', ', ')}`), 'the image runs npm start\'s command, last')
})

t.test("each replica's grace period outlasts its shutdown deadline (SHUTDOWN_DELAY and the drain), as the README's Operations require", async (t) => {
  for (const [name, service] of replicas) {
    const config = loadConfig(service.environment ?? {})
    const deadline = config.shutdownDelayMs + shutdownDeadlineFor(config.care360.timeoutMs)
    t.type(service.stop_grace_period, 'string', `${name} sets stop_grace_period`)
    const grace = parseDuration(service.stop_grace_period ?? '0s')
    t.ok(grace > deadline, `${name}: ${grace} ms of grace > ${deadline} ms of deadline`)
  }
})
