import type { Demo } from './stack.js'

/** What the demo prints once it runs: where to go, who to be, and the mobile path with curl. */
export function walkthrough (demo: Demo): string {
  const { urls } = demo
  const alice = demo.patients.find((patient) => patient.email === 'alice@example.com') ?? demo.patients[0]
  const appointmentId = alice?.appointments[0]?.id ?? '<appointment id>'
  const width = Math.max(...Object.values(urls).map((url) => url.length))
  const accounts = demo.accounts.map((account) => {
    const patient = demo.patients.find((candidate) => candidate.email === account.email)
    const note = !account.emailVerified
      ? 'email not verified: sign-in is refused'
      : `${patient?.appointments.length ?? 0} upcoming appointment(s)`
    return `    ${account.email.padEnd(24)} ${account.name.padEnd(20)} ${note}`
  }).join('\n')

  return `
Care360 patient BFF demo: everything on loopback, in-memory state, no Care360 key needed.

  Patient web page   ${urls.page.padEnd(width)}  <- open this
  Service (BFF)      ${urls.service.padEnd(width)}  (OpenAPI: ${urls.service}/openapi.json)
  Identity provider  ${urls.idp.padEnd(width)}  (development OIDC provider, one-click sign-in)
  Care360 sandbox    ${urls.sandbox.padEnd(width)}  (seeded; POST /__sandbox/failure, /__sandbox/reset)

Demo patients (choose one on the provider's sign-in page):
${accounts}

Mobile path with curl (in another terminal):

  # 1. An ID token for the mobile client "${demo.mobileClientId}" (code flow with PKCE at the provider):
  ID_TOKEN=$(DEMO_IDP_URL=${urls.idp} npm run -s demo:id-token -- alice@example.com)

  # 2. Exchange it for a session token:
  TOKEN=$(curl -s -X POST ${urls.service}/auth/session -H 'content-type: application/json' \\
    -d "{\\"idToken\\":\\"$ID_TOKEN\\"}" | node -pe 'JSON.parse(require("fs").readFileSync(0)).data.token')

  # 3. List the upcoming appointments:
  curl -s ${urls.service}/appointments -H "authorization: Bearer $TOKEN"

  # 4. Cancel one (run it twice: the same Idempotency-Key replays the first answer):
  curl -s -X POST ${urls.service}/appointments/${appointmentId}/cancel \\
    -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' \\
    -H 'Idempotency-Key: demo-cancel-1' -d '{"reason":"Feeling better"}'

  # Make Care360 misbehave for the next call (then try the cancel or the list again):
  curl -s -X POST ${urls.sandbox}/__sandbox/failure -H 'content-type: application/json' \\
    -d '{"kind":"status","status":503,"times":1}'

  # Sign out (ends the session token):
  curl -s -X POST ${urls.service}/auth/logout -H "authorization: Bearer $TOKEN"

Ctrl-C stops everything.
`
}
