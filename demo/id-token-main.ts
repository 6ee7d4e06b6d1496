import process from 'node:process'
import { mobileIdToken } from './id-token.js'

/**
 * `npm run -s demo:id-token -- alice@example.com`: prints an ID token for the demo's mobile
 * client, from the running demo's IdP (DEMO_IDP_URL, default http://127.0.0.1:4000).
 */

const email = process.argv[2]
if (email === undefined || !email.includes('@')) {
  process.stderr.write('usage: npm run -s demo:id-token -- <demo account email, e.g. alice@example.com>\n')
  process.exit(2)
}
const issuer = process.env.DEMO_IDP_URL ?? `http://127.0.0.1:${process.env.DEMO_IDP_PORT ?? '4000'}`
try {
  process.stdout.write(`${await mobileIdToken({ issuer, email })}\n`)
} catch (error) {
  const reason = (error as { cause?: { code?: string } }).cause?.code === 'ECONNREFUSED'
    ? `nothing answers at ${issuer}: is npm run demo running?`
    : (error as Error).message
  process.stderr.write(`no ID token: ${reason}\n`)
  process.exit(1)
}
