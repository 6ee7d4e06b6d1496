import t from 'tap'
import { ConfigError, loadConfig } from '../src/config.js'

/**
 * The contract: OIDC_CLIENT_ID, OIDC_CLIENT_SECRET and PUBLIC_URL are "required for web sign-in",
 * and a bad or missing value stops start-up naming the variable. Only PUBLIC_URL set alone was in
 * the suite: a rule that looked at PUBLIC_URL only would have let a client secret without
 * PUBLIC_URL start with web sign-in silently off.
 */

const mobile = { CV_API_KEY: 'org-secret-key-123', OIDC_ISSUER: 'https://idp.example.com' }
const web = { OIDC_CLIENT_ID: 'patient-web', OIDC_CLIENT_SECRET: 'client-secret-value', PUBLIC_URL: 'https://patients.example.com' }

function refused (env: Record<string, string>): ConfigError {
  try {
    loadConfig(env)
  } catch (error) {
    if (error instanceof ConfigError) return error
    throw error
  }
  throw new Error(`accepted: ${Object.keys(env).join(', ')}`)
}

t.test('web sign-in: all three, or none but the client id; any other part set alone or in two names what is missing', async (t) => {
  t.same(loadConfig({ ...mobile, ...web }).oidc.web, { clientId: 'patient-web', clientSecret: 'client-secret-value', publicUrl: 'https://patients.example.com', webAppUrl: 'https://patients.example.com' })
  t.equal(loadConfig({ ...mobile, OIDC_CLIENT_ID: 'patient-web' }).oidc.web, null, 'the client id alone: mobile sign-in only (it is the default audience)')
  const parts = Object.keys(web) as Array<keyof typeof web>
  for (const missing of parts) {
    const env: Record<string, string> = { ...mobile, OIDC_AUDIENCES: 'patient-mobile' }
    for (const part of parts) if (part !== missing) env[part] = web[part]
    const error = refused(env)
    t.same(error.variables, [missing], `${parts.filter((part) => part !== missing).join(' + ')} without ${missing}`)
    t.match(error.message, `${missing}: is required for web sign-in`)
    t.notMatch(error.message, 'client-secret-value', 'the client secret is never quoted')
  }
  for (const alone of ['OIDC_CLIENT_SECRET', 'PUBLIC_URL'] as const) {
    const error = refused({ ...mobile, OIDC_AUDIENCES: 'patient-mobile', [alone]: web[alone] })
    t.same(new Set(error.variables), new Set(parts.filter((part) => part !== alone)), `${alone} alone names the other two`)
  }
})
