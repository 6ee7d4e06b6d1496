// The demo patient web app: plain DOM, no framework, no build. Every call to the service sends
// the session cookie (credentials: 'include'); every state-changing one sends `X-CSRF: 1`, the
// anti-forgery header the service requires of cookie sessions. The page never sees the session:
// the cookie is HttpOnly.

const $ = (id) => document.getElementById(id)

const FAILURES = {
  'status-503': { kind: 'status', status: 503, times: 1 },
  'status-401': { kind: 'status', status: 401, times: 1 },
  'status-400': { kind: 'status', status: 400, endpoint: 'cancel', times: 1, body: { status: 400, success: false, message: 'Invalid request', error: 'Appointment can no longer be cancelled' } },
  'rate-limited': { kind: 'rate-limited', retryAfter: '5', times: 1 },
  slow: { kind: 'slow', delayMs: 7000, times: 1 },
  reset: { kind: 'reset', times: 1 }
}

const SIGN_IN_ERRORS = {
  access_denied: 'Sign-in was cancelled.',
  email_unverified: 'Your email address is not verified at the identity provider.',
  login_expired: 'The sign-in took too long or was started elsewhere. Please try again.',
  idp_unavailable: 'The identity provider cannot be reached right now.',
  rate_limited: 'Too many requests from your network just now. Please wait a minute and sign in again.'
}

let apiUrl = ''
/** Idempotency keys of cancels whose outcome is unknown, so that a retry cannot cancel twice. */
const pendingKeys = new Map()

function say (text) {
  $('errors').textContent = ''
  $('messages').textContent = text
}

/** An error answer of the service: its message, its code, and what to do about it. */
function showError (what, answer) {
  $('messages').textContent = ''
  const box = $('errors')
  box.textContent = ''
  const heading = document.createElement('strong')
  heading.textContent = `${what} failed`
  const detail = document.createElement('p')
  const body = answer.body ?? {}
  const parts = [body.message ?? `HTTP ${answer.status}`]
  if (body.error) parts.push(`(${body.error})`)
  detail.textContent = parts.join(' ')
  const code = document.createElement('p')
  code.className = 'code'
  code.textContent = `Status ${answer.status}${body.code ? `, code ${body.code}` : ''}${answer.requestId ? `, request ${answer.requestId}` : ''}`
  box.append(heading, detail, code)
  if (answer.status === 429) {
    const retry = document.createElement('p')
    const seconds = answer.retryAfter ?? '?'
    retry.textContent = `Too many requests: please wait ${seconds} second(s) before trying again.`
    box.append(retry)
  }
  if (answer.status === 401) showSignedOut()
}

/** One call to the service; never throws: network failures come back as status 0. */
async function call (method, path, { body, headers = {} } = {}) {
  const init = { method, credentials: 'include', headers: { ...headers } }
  if (method !== 'GET') init.headers['x-csrf'] = '1'
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json'
    init.body = JSON.stringify(body)
  }
  try {
    const response = await fetch(`${apiUrl}${path}`, init)
    let parsed = null
    try { parsed = await response.json() } catch { parsed = null }
    return {
      status: response.status,
      ok: response.ok,
      body: parsed,
      retryAfter: response.headers.get('retry-after'),
      requestId: response.headers.get('x-request-id')
    }
  } catch {
    return { status: 0, ok: false, body: { message: 'The service cannot be reached' } }
  }
}

function formatWhen (start, end) {
  if (!start) return 'Time to be confirmed'
  const options = { dateStyle: 'full', timeStyle: 'short' }
  const from = new Date(start).toLocaleString(undefined, options)
  const to = end ? new Date(end).toLocaleTimeString(undefined, { timeStyle: 'short' }) : ''
  return to ? `${from} – ${to}` : from
}

function showSignedOut () {
  $('who').textContent = 'You are not signed in.'
  $('who').dataset.state = 'signed-out'
  $('sign-in').hidden = false
  $('sign-out').hidden = true
  $('appointments-section').hidden = true
  $('appointments').textContent = ''
}

async function loadAppointments () {
  const answer = await call('GET', '/appointments')
  if (!answer.ok) {
    showError('Loading your appointments', answer)
    return
  }
  const list = $('appointments')
  list.textContent = ''
  const template = $('appointment-template')
  for (const appointment of answer.body.data) {
    const item = template.content.firstElementChild.cloneNode(true)
    item.dataset.id = appointment.id
    item.querySelector('.title').textContent = appointment.title ?? 'Appointment'
    item.querySelector('.when').textContent = formatWhen(appointment.start, appointment.end)
    item.querySelector('.with').textContent = [appointment.topic, appointment.agentName && `with ${appointment.agentName}`].filter(Boolean).join(', ')
    const form = item.querySelector('form')
    form.setAttribute('aria-label', `Cancel ${appointment.title ?? 'appointment'}`)
    form.addEventListener('submit', (event) => {
      event.preventDefault()
      cancel(appointment, form)
    })
    list.append(item)
  }
  $('appointments-empty').hidden = answer.body.data.length > 0
  $('appointments-section').hidden = false
}

async function cancel (appointment, form) {
  const reason = form.elements.reason.value.trim()
  const button = form.querySelector('button')
  // The same appointment and reason after an unknown outcome reuse the key: the service then
  // replays the first answer instead of cancelling again.
  const pendingKey = `${appointment.id}\n${reason}`
  const key = pendingKeys.get(pendingKey) ?? crypto.randomUUID()
  pendingKeys.set(pendingKey, key)
  button.disabled = true
  const answer = await call('POST', `/appointments/${encodeURIComponent(appointment.id)}/cancel`, {
    body: reason === '' ? {} : { reason },
    headers: { 'idempotency-key': key }
  })
  button.disabled = false
  // Only a network failure, a timeout or an upstream error leaves the outcome unknown.
  if (!(answer.status === 0 || answer.status >= 500)) pendingKeys.delete(pendingKey)
  if (!answer.ok) {
    showError('Cancelling', answer)
    return
  }
  say(`Cancelled: ${appointment.title ?? 'appointment'}. ${answer.body?.message ?? ''}`)
  await loadAppointments()
}

async function signOut () {
  const answer = await call('POST', '/auth/logout')
  if (!answer.ok && answer.status !== 401) {
    showError('Signing out', answer)
    return
  }
  showSignedOut()
  say('You are signed out.')
  // End the identity provider's session as well, when it offers to.
  const endSessionUrl = answer.body?.data?.endSessionUrl
  if (endSessionUrl) window.location.assign(endSessionUrl)
}

async function setFailure () {
  const failure = FAILURES[$('failure').value]
  const response = await fetch('/demo/sandbox-failure', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(failure) })
  await response.text()
  say(response.ok ? 'The next Care360 call will fail. Refresh or cancel to see the answer.' : 'Could not set the failure.')
}

async function resetSandbox () {
  const response = await fetch('/demo/sandbox-reset', { method: 'POST' })
  await response.text()
  say(response.ok ? 'Sandbox reset: every appointment is back.' : 'Could not reset the sandbox.')
  if (!$('appointments-section').hidden) await loadAppointments()
}

async function start () {
  apiUrl = (await (await fetch('/demo-config.json')).json()).apiUrl
  const params = new URLSearchParams(window.location.search)
  const signInError = params.get('signin_error')
  if (signInError !== null) {
    showError('Signing in', { status: 401, body: { message: SIGN_IN_ERRORS[signInError] ?? 'Sign-in did not complete.', code: signInError } })
    // Keep the address bar clean, so a reload does not show the error again.
    window.history.replaceState(null, '', window.location.pathname)
  }
  $('sign-in').href = `${apiUrl}/auth/login?returnTo=${encodeURIComponent('/')}`
  $('sign-out').addEventListener('click', signOut)
  $('refresh').addEventListener('click', loadAppointments)
  $('set-failure').addEventListener('click', setFailure)
  $('reset-sandbox').addEventListener('click', resetSandbox)

  const me = await call('GET', '/auth/me')
  if (!me.ok) {
    showError('Checking your session', me)
    showSignedOut()
    return
  }
  if (!me.body.data.authenticated) {
    showSignedOut()
    return
  }
  $('who').textContent = `Signed in as ${me.body.data.email}.`
  $('who').dataset.state = 'signed-in'
  $('sign-in').hidden = true
  $('sign-out').hidden = false
  await loadAppointments()
}

start()
