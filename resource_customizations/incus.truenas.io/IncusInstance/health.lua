-- Argo CD health for incus.truenas.io/IncusInstance (truenas-incus-operator).
-- Degraded: Synced=False (TrueNAS refused the spec, unreachable, not ours, ...), TrueNAS
--           reports the instance in ERROR, or phase Unknown (the instance is not observed: the
--           status shows the last observation, which nobody can vouch for).
-- Progressing: no status yet, the operator has not acted on the latest spec, creating, starting,
--              stopping, stopped or frozen when it should run.
-- Suspended: spec.powerState is Stopped and the instance is stopped.
-- Healthy: Ready=True.
-- Argo CD never runs this for an object being deleted (deletionTimestamp set): it shows
-- Progressing "Pending deletion" itself, so there is no deletion branch here; a stuck deletion
-- shows in status (phase Deleting, Synced=False DeleteFailed) and in the object's Events.
local hs = {status = "Progressing", message = "Waiting for the operator"}
local status = obj.status
if status == nil then
  return hs
end
local ready, synced
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "Ready" then ready = condition end
    if condition.type == "Synced" then synced = condition end
  end
end
if synced ~= nil and synced.status == "False" then
  hs.status = "Degraded"
  hs.message = (synced.reason or "NotSynced") .. ": " .. (synced.message or "")
  return hs
end
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.message = "Waiting for the operator to apply generation " .. generation
  return hs
end
local detail = ""
if ready ~= nil and ready.message ~= nil then
  detail = ": " .. ready.message
end
if status.phase == "Error" or status.phase == "Unknown" then
  hs.status = "Degraded"
  hs.message = status.phase .. detail
  return hs
end
if obj.spec ~= nil and obj.spec.powerState == "Stopped" and status.phase == "Stopped" then
  hs.status = "Suspended"
  hs.message = "Stopped, as spec.powerState asks"
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
  return hs
end
hs.message = (status.phase or "Pending") .. detail
return hs
