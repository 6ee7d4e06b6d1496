// The shedding scenario's flood, in a process of its own (bench/run.ts, SHED_FLOOD=process): a
// closed loop of POSTs from one client address, every body different, so that the driver process,
// which times the legitimate client, does not also carry the flood's event loop.
// Environment: FLOOD (JSON: url, path, headers, seconds, connections). Prints one line when the
// load starts ({"started":true}) and one when it ends: the answers' codes and the latencies (ms) of
// the 2xx and of the 429 answers.
import autocannon from 'autocannon'

const spec = JSON.parse(process.env.FLOOD ?? '{}')
let sequence = 0
const ok = []
const shed = []
const t0 = performance.now()
const instance = autocannon({
  url: spec.url,
  connections: spec.connections,
  duration: spec.seconds,
  timeout: 10,
  requests: [{
    method: 'POST',
    path: spec.path,
    headers: spec.headers,
    setupRequest: (request) => ({ ...request, body: `{"reason":"flood ${sequence++}"}` })
  }]
}, (error, result) => {
  if (error) {
    console.error(error)
    process.exit(1)
  }
  const codes = {}
  for (const [code, { count }] of Object.entries(result.statusCodeStats)) codes[code] = count
  process.stdout.write(JSON.stringify({ seconds: (performance.now() - t0) / 1000, codes, errors: result.errors + result.timeouts, ok, shed }) + '\n')
})
instance.on('response', (_client, status, _bytes, ms) => {
  if (status >= 200 && status < 300) ok.push(ms)
  else if (status === 429) shed.push(ms)
})
process.stdout.write('{"started":true}\n')
