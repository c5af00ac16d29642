-- Argo CD health for incus.truenas.io/IncusInstanceRestore (truenas-incus-operator).
-- A restore runs once, like a Job, and keeps its outcome:
-- Healthy: phase Succeeded (rolled back, and the instance brought back as its powerState says).
-- Degraded: phase Failed: the rollback would destroy newer snapshots (NewerSnapshots names them),
--           the snapshot or the instance is not found, the policy refuses it, TrueNAS refused it.
-- Progressing: no status yet, Pending (waiting, or a failure it will retry), Stopping,
--              RollingBack, Starting.
-- Argo CD shows an object being deleted as Progressing "Pending deletion" without running this;
-- a hook that still has Argo CD's hook finalizer keeps its outcome, as a Job does. A condition
-- message over 512 bytes is not relayed (argocd-cm scripts have no string library to cut it):
-- the reason then points at the Ready condition.
local hs = {status = "Progressing", message = "Waiting for the operator"}
local status = obj.status
if status == nil then
  return hs
end
local ready
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "Ready" then ready = condition end
  end
end
local reason, detail = nil, ""
if ready ~= nil then
  reason = ready.reason
  if ready.message ~= nil and #ready.message > 512 then
    detail = " (see the Ready condition)"
  elseif ready.message ~= nil and ready.message ~= "" then
    detail = ": " .. ready.message
  end
end
if status.phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "restored"
  if status.snapshotName ~= nil then hs.message = "restored to snapshot " .. status.snapshotName end
  if status.destroyedSnapshots ~= nil and #status.destroyedSnapshots > 0 then
    hs.message = hs.message .. "; newer snapshots destroyed: " .. #status.destroyedSnapshots
  end
  return hs
end
if status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = (reason or "Failed") .. detail
  return hs
end
local phase = status.phase or "Pending"
if reason ~= nil and reason ~= phase then
  phase = phase .. " (" .. reason .. ")"
end
hs.message = phase .. detail
return hs
